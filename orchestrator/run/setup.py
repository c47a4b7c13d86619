"""A rank's model and engine: the model built (rank 0 real, the others on the meta device),
the model converters applied in their order (transforms/converters.py), and the strategy that
wraps it, chosen from `STRATEGIES` by `config.derived.strategy_name`. Each strategy module has
one `setup(model, job, device) -> Engine`; a new strategy is one module and one entry here.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence

import torch
from torch import nn

from orchestrator.common.contract import DEVICE_ENV
from orchestrator.config.derived import strategy_name
from orchestrator.config.schema import JobConfig
from orchestrator.models.build import build_model, transformer_blocks
from orchestrator.quantization.int8 import saved_method
from orchestrator.run import distributed
from orchestrator.run.precision import model_dtype
from orchestrator.run.strategies.base import Engine
from orchestrator.transforms.converters import apply_converters

# strategy name -> the module whose setup() wraps the model (imported when chosen: DeepSpeed's
# import alone takes seconds)
STRATEGIES = {
    "ddp": "orchestrator.run.strategies.ddp",
    "zero1": "orchestrator.run.strategies.zero1",
    "fsdp2": "orchestrator.run.strategies.fsdp",
    "deepspeed": "orchestrator.run.strategies.deepspeed",
    "pipeline": "orchestrator.run.strategies.pipeline",
    "context_parallel": "orchestrator.run.strategies.context_parallel",
}


def setup(model: nn.Module, job: JobConfig, device: str) -> Engine:
    """Wrap the converted model with the job's strategy (ZeRO: 1 optimizer state, 2 +
    gradients, 3 + parameters)."""
    chosen = importlib.import_module(STRATEGIES[strategy_name(job)])
    engine: Engine = chosen.setup(model, job, device)
    engine.compiled_blocks = len(transformer_blocks(model)) if job.train.compile else 0
    return engine


def _loader(job: JobConfig) -> Callable[[str], nn.Module] | None:
    """An int8 model directory's own reader (quantization/ptq.py); None: from_pretrained."""
    if not saved_method(job.model.pretrained_path):
        return None
    from orchestrator.quantization.ptq import load_quantized

    return load_quantized


def build_for_rank(job: JobConfig, info: distributed.RankInfo,
                   converters: Sequence[str] | None = None) -> nn.Module:
    """The job's model in the run's dtype, its converters applied (only those named in
    `converters`, when given): real on rank 0 (random from `train.seed`, or read from
    `model.pretrained_path`), on the meta device on every other rank of a multi-rank job.
    The strategy then gives each rank storage for its own part (FSDP2: its shards) and fills it
    from rank 0, so a node holds at most one full copy in host memory instead of one per rank,
    and the weights are rank 0's whatever the world size or strategy."""
    device = "meta" if info.world_size > 1 and info.rank != 0 else "cpu"
    model = build_model(job.model, seed=job.train.seed, device=device, load=_loader(job))
    with torch.device(device):
        model = apply_converters(model, job, converters)
    # Same RNG state on every rank afterwards, whether or not its initialisation drew from it.
    torch.manual_seed(job.train.seed)
    return model.to(model_dtype(job.precision.name))


def run_inference(job: JobConfig, body: Callable[[Engine, distributed.RankInfo], None]) -> None:
    """Evaluation and generation: join the process group, build the model (random, or
    `model.pretrained_path`) in the run's dtype, wrap it with the configured strategy (ZeRO-3
    shards it as in training) and call `body(engine, rank)`. The group is destroyed after body
    returns, when nothing holds the engine any more (a gloo group freed during interpreter
    shutdown while DDP still holds it can abort the process)."""
    device = os.environ.get(DEVICE_ENV, "cpu")
    info = distributed.init(device, job.dist.timeout_s)
    try:
        model = build_for_rank(job, info)
        body(setup(model, job, device), info)
        del model
    finally:
        distributed.shutdown()
