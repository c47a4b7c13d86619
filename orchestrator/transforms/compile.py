"""`train.compile`: `torch.compile` of every transformer block, in place, before the strategy
wraps the model (DDP, ZeRO-1, FSDP2).

Per-block, as torchtitan (`apply_compile`, before `apply_fsdp`/`apply_ddp`) and torchtune
(`compile_model`: `m.compile()` on each layer, before sharding) do it: the blocks share one
graph, so the compile cost does not grow with depth, and the code between blocks (embeddings,
loss, DDP's and FSDP2's hooks, which FSDP2 marks `torch._dynamo.disable`) stays eager.
`nn.Module.compile()` compiles the block's `__call__` in place, so parameter names, state
dicts, checkpoints and `save_pretrained` are unchanged (`torch.compile(block)` would add an
`_orig_mod.` level to every name).

Inductor caches its kernels in TORCHINDUCTOR_CACHE_DIR (default /tmp/torchinductor_<user>,
one per node). The ranks of a node share it safely: each kernel is built under a file lock on
its key and skipped when its binary exists (torch/_inductor/codecache.py), and entries are
written atomically, so the node's ranks build every kernel once between them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.common.errors import ConfigError
from orchestrator.config.derived import missing_build_tool
from orchestrator.config.schema import JobConfig

if TYPE_CHECKING:  # validation imports this module without importing torch
    from torch import nn


def check(job: JobConfig, device: str) -> None:
    """Refuse `train.compile=true` where it is not supported, in one line."""
    if not job.train.compile:
        return
    if job.parallelism.backend == "deepspeed":
        raise ConfigError("train.compile", True, "false with parallelism.backend='deepspeed' "
                          "(its engine wraps the model itself; compile is supported for DDP, "
                          "ZeRO-1 and FSDP2)")
    if job.train.task != "pretrain":
        raise ConfigError("train.compile", True, f"false for train.task={job.train.task} "
                          "(compile applies to training)")
    if job.action == "run" and job.launcher.name == "local":  # the machine that builds
        language = "c++" if device == "cpu" else "c"  # inductor's C++, or Triton's launcher
        missing = missing_build_tool(language)
        if missing:
            builder = "inductor's CPU kernels" if device == "cpu" else "Triton's CUDA launcher"
            raise ConfigError("train.compile", True, f"false here: {builder} need {missing}")


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compile each transformer block in place (`backend`: torch.compile's; a test may trace
    with `aot_eager`, which skips inductor's kernel builds); return how many were compiled.

    The blocks are also told not to build a KV cache (`config.use_cache=False`, as for
    gradient checkpointing): training never reads it, and the cache object, which differs from
    block to block, would make dynamo compile one graph per block and fall back to eager after
    `torch._dynamo.config.recompile_limit` (8) of them."""
    import torch._dynamo

    from orchestrator.models.build import transformer_blocks

    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", None):
            config.use_cache = False
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile(backend=backend)
    # room for one graph per block after all (e.g. T5's first block holds the position bias),
    # with and without grad (held-out evaluation runs under no_grad)
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 2 * len(blocks))
    return len(blocks)


def compiled_graphs() -> int:
    """How many distinct graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
