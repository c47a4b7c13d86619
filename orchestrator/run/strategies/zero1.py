"""ZeRO stage 1: DDP + `ZeroRedundancyOptimizer`, which shards the optimizer state by whole
parameters; each rank steps its own parameters and broadcasts them (one flat bucket per rank)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from orchestrator.config.schema import JobConfig
from orchestrator.run.strategies.base import Engine, optimizer_class, trainable
from orchestrator.run.strategies.ddp import DDPEngine, make_engine, wrap

OPTIM_FILE = "zero1_optimizer.pt"


class Zero1Engine(DDPEngine):
    def local_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer.optim  # steps only this rank's partition

    def optimizer_state(self) -> Iterator[torch.Tensor]:
        for state in self.optimizer.optim.state.values():  # only this rank's partition
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))

    def save_checkpoint(self, path: Path) -> None:
        """The model through torch.distributed.checkpoint; the optimizer state, which
        ZeroRedundancyOptimizer shards by whole parameters outside DCP's reach, consolidated on
        rank 0 and saved whole (any world size can load it: each rank takes its partition)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        dcp.save({"model": get_model_state_dict(self.model)}, checkpoint_id=str(path))
        self.optimizer.consolidate_state_dict(to=0)
        if dist.get_rank() == 0:
            torch.save(self.optimizer.state_dict(), path / OPTIM_FILE)

    def load_checkpoint(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            set_model_state_dict,
        )

        state = {"model": get_model_state_dict(self.model)}
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(self.model, state["model"])
        self.optimizer.load_state_dict(torch.load(path / OPTIM_FILE, weights_only=True))


def setup(model: nn.Module, job: JobConfig, device: str) -> Engine:
    ddp = wrap(model, job, device)
    cls, kwargs = optimizer_class(job)
    # Bucket views: each rank's parameters live in one flat buffer per device, so the step's
    # parameter broadcast is one collective per rank instead of one per parameter.
    optimizer = ZeroRedundancyOptimizer(trainable(ddp.parameters()), optimizer_class=cls,
                                        parameters_as_bucket_view=True, **kwargs)
    return make_engine(ddp, optimizer, job, device, cls=Zero1Engine)
