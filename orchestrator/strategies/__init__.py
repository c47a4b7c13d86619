"""Parallelism strategies. Each module has one `setup(model, job, device) -> Engine`."""

from __future__ import annotations

import os
from collections.abc import Callable

from torch import nn

from orchestrator import distributed
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


def run_inference(job: JobConfig, body: Callable[[Engine, distributed.RankInfo], None]) -> None:
    """Evaluation and generation: join the process group, build the model (random, or
    `model.pretrained_path`) in the run's dtype, wrap it with the configured strategy (ZeRO-3
    shards it as in training) and call `body(engine, rank)`. The group is destroyed after body
    returns, when nothing holds the engine any more (a gloo group freed during interpreter
    shutdown while DDP still holds it can abort the process)."""
    from orchestrator.models import build_model
    from orchestrator.precision import model_dtype

    device = os.environ.get("ORCHESTRATOR_DEVICE", "cpu")
    info = distributed.init(device)
    try:
        model = build_model(job.model, seed=job.train.seed).to(model_dtype(job.precision.name))
        body(setup(model, job, device), info)
        del model
    finally:
        distributed.shutdown()
