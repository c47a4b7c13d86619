"""DDP (ZeRO stage 0): every rank holds full parameters, gradients and optimizer state."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from orchestrator.config.schema import JobConfig
from orchestrator.run import precision as prec
from orchestrator.run.strategies.base import Engine, build_optimizer, materialize


class DDPEngine(Engine):
    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext() if sync else self.model.no_sync()


def wrap(model: nn.Module, job: JobConfig, device: str) -> DistributedDataParallel:
    """Gradients as views into DDP's buckets: without it DDP keeps a second full copy. A model
    built on the meta device (ranks other than 0) gets empty storage here: DDP's constructor
    broadcasts rank 0's parameters and buffers to every rank (its documented init sync)."""
    materialize(model, device)
    ids = [torch.cuda.current_device()] if device == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True,
                                   bucket_cap_mb=job.parallelism.bucket_cap_mb)


def make_engine(model: DistributedDataParallel, optimizer: torch.optim.Optimizer, job: JobConfig,
                device: str, cls: type[DDPEngine] = DDPEngine) -> DDPEngine:
    p = job.precision
    scaler = prec.grad_scaler(p.name, device, False, p.init_scale, p.growth_interval)
    # The buckets outlive zero_grad anyway; keeping .grad as views frees nothing less.
    return cls(model, optimizer, job, device, scaler=scaler, set_to_none=False)


def setup(model: nn.Module, job: JobConfig, device: str) -> Engine:
    ddp = wrap(model, job, device)
    return make_engine(ddp, build_optimizer(ddp.parameters(), job), job, device)
