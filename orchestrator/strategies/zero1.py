"""ZeRO stage 1: DDP + `ZeroRedundancyOptimizer`, which shards the optimizer state by whole
parameters; each rank steps its own parameters and broadcasts them (one flat bucket per rank)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from orchestrator.schema import JobConfig
from orchestrator.strategies.base import Engine, optimizer_class, trainable
from orchestrator.strategies.ddp import DDPEngine, make_engine, wrap


class Zero1Engine(DDPEngine):
    def optimizer_state(self) -> Iterator[torch.Tensor]:
        for state in self.optimizer.optim.state.values():  # only this rank's partition
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def setup(model: nn.Module, job: JobConfig, device: str) -> Engine:
    ddp = wrap(model, job, device)
    cls, kwargs = optimizer_class(job.optim)
    # Bucket views: each rank's parameters live in one flat buffer per device, so the step's
    # parameter broadcast is one collective per rank instead of one per parameter.
    optimizer = ZeroRedundancyOptimizer(trainable(ddp.parameters()), optimizer_class=cls,
                                        parameters_as_bucket_view=True, **kwargs)
    return make_engine(ddp, optimizer, job, device, cls=Zero1Engine)
