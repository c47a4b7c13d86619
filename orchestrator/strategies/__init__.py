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
    3 + parameters). With `train.compile` each transformer block is compiled in place first
    (orchestrator/compiling.py), so DDP and FSDP2 wrap the compiled blocks; with
    `precision=fp8` the linear layers become float8 ones before that, with `precision.qat`
    fake-quantized ones (orchestrator/qat.py)."""
    if job.precision.qat != "none":  # before compiling and wrapping, on meta ranks too
        from orchestrator.qat import prepare

        prepare(model)
    if job.precision.name == "fp8":  # before compiling and wrapping: they see Float8Linear
        from orchestrator.precision import to_float8

        to_float8(model)
    compiled = 0
    if job.train.compile:
        from orchestrator.compiling import compile_blocks

        compiled = compile_blocks(model)
    stage = job.parallelism.zero_stage
    if job.parallelism.backend == "deepspeed":
        from orchestrator.strategies.deepspeed import setup as chosen
    elif stage == 0:
        from orchestrator.strategies.ddp import setup as chosen
    elif stage == 1:
        from orchestrator.strategies.zero1 import setup as chosen
    else:
        from orchestrator.strategies.fsdp import setup as chosen
    engine = chosen(model, job, device)
    engine.compiled_blocks = compiled
    return engine


def build_for_rank(job: JobConfig, info: distributed.RankInfo) -> nn.Module:
    """The job's model in the run's dtype: real on rank 0 (random from `train.seed`, or read
    from `model.pretrained_path`), on the meta device on every other rank of a multi-rank job.
    The strategy then gives each rank storage for its own part (FSDP2: its shards) and fills it
    from rank 0, so a node holds at most one full copy in host memory instead of one per rank,
    and the weights are rank 0's whatever the world size or strategy."""
    import torch

    from orchestrator.models import build_model
    from orchestrator.precision import model_dtype

    device = "meta" if info.world_size > 1 and info.rank != 0 else "cpu"
    model = build_model(job.model, seed=job.train.seed, device=device, lora=job.lora,
                        dpo_beta=job.dpo_beta)
    # Same RNG state on every rank afterwards, whether or not its initialisation drew from it.
    torch.manual_seed(job.train.seed)
    return model.to(model_dtype(job.precision.name))


def run_inference(job: JobConfig, body: Callable[[Engine, distributed.RankInfo], None]) -> None:
    """Evaluation and generation: join the process group, build the model (random, or
    `model.pretrained_path`) in the run's dtype, wrap it with the configured strategy (ZeRO-3
    shards it as in training) and call `body(engine, rank)`. The group is destroyed after body
    returns, when nothing holds the engine any more (a gloo group freed during interpreter
    shutdown while DDP still holds it can abort the process)."""
    device = os.environ.get("ORCHESTRATOR_DEVICE", "cpu")
    info = distributed.init(device, job.dist.timeout_s)
    try:
        model = build_for_rank(job, info)
        body(setup(model, job, device), info)
        del model
    finally:
        distributed.shutdown()
