"""Parallelism strategies. Each module has one `setup(model, job, device) -> Engine`."""

from __future__ import annotations

from torch import nn

from orchestrator.schema import JobConfig
from orchestrator.strategies.base import Engine


def setup(model: nn.Module, job: JobConfig, device: str) -> Engine:
    """Pick the strategy for `parallelism.zero_stage` (ZeRO: 1 optimizer state, 2 + gradients,
    3 + parameters)."""
    stage = job.parallelism.zero_stage
    if job.parallelism.backend == "deepspeed":
        from orchestrator.strategies.deepspeed import setup as chosen
    elif stage == 0:
        from orchestrator.strategies.ddp import setup as chosen
    elif stage == 1:
        from orchestrator.strategies.zero1 import setup as chosen
    else:
        from orchestrator.strategies.fsdp import setup as chosen
    return chosen(model, job, device)
