"""The DeepSpeed config, generated from our config (never hand-maintained JSON), and its check
against DeepSpeed's own config model before anything launches.

Generated from the same fields the FSDP2 path uses: batch split, clipping, precision and ZeRO
stage. The ZeRO section is DeepSpeed's own defaults (5e8-element reduce / all-gather buckets,
5e7 prefetch, 1e9 live parameters, persistence threshold 1e5, communication overlapped with
compute), raised to one transformer block where a block is larger, on every device: on CPU
they ran faster than the block-sized buckets and sub-block prefetch this project used to set
there (issue 27, docs/benchmarks.md), and the memory plan models what they do (planning/memory.py:
persistent parameters, the prefetched working set). Offload uses pinned host memory on GPUs.

`parallelism.deepspeed` is merged over the result.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from orchestrator.common.errors import ConfigError
from orchestrator.common.secrets import scrub, secret_values
from orchestrator.config.schema import JobConfig

NEVER_PRINT = 2**31 - 1  # DeepSpeed's own step prints: our loop logs instead


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# DeepSpeed's defaults (deepspeed/runtime/zero/config.py), in elements
DS_BUCKET, DS_PREFETCH, DS_PERSISTENCE = 500_000_000, 50_000_000, 100_000


def largest_block(job: JobConfig) -> int:
    """Elements of the largest transformer block (the ZeRO-3 gather unit)."""
    from orchestrator.models.spec_cache import cached_specs

    blocks: dict[str, int] = {}
    for s in cached_specs(job.model, job.lora, job.dpo_beta):
        if s.group.startswith("block."):
            blocks[s.group] = blocks.get(s.group, 0) + s.numel
    return max(blocks.values(), default=0)


def _zero_section(job: JobConfig, device: str) -> dict[str, Any]:
    p = job.parallelism
    zero: dict[str, Any] = {"stage": p.zero_stage, "contiguous_gradients": True}
    # DeepSpeed's own defaults on every device (they are also the fastest measured on CPU,
    # docs/benchmarks.md), raised to one transformer block where a block is larger: a block
    # moves in one collective and is prefetched whole
    block = largest_block(job)
    bucket, prefetch = max(DS_BUCKET, block), max(DS_PREFETCH, block)
    zero.update({"overlap_comm": True, "reduce_bucket_size": bucket,
                 "allgather_bucket_size": bucket})
    if p.zero_stage == 3:
        zero.update({"stage3_prefetch_bucket_size": prefetch,
                     "stage3_param_persistence_threshold": DS_PERSISTENCE})
    if p.zero_stage == 3 and p.replicate_degree > 1:
        # ZeRO++ hpZ: a secondary copy of the parameters partitioned within each group of
        # world/R ranks (a node), so forward/backward all-gathers stay inside it
        zero["zero_hpz_partition_size"] = job.world_size // p.replicate_degree
    pin = device == "cuda"  # pinned host buffers for fast copies; pointless without a GPU
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return zero


def generate(job: JobConfig, grad_accum: int, global_batch: int,
             device: str = "cpu") -> dict[str, Any]:
    """The DeepSpeed config for `job` on `device` (cpu | cuda)."""
    zero = _zero_section(job, device)
    cfg: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": job.train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": job.train.grad_clip,
        "steps_per_print": NEVER_PRINT,
        "wall_clock_breakdown": False,
        "zero_optimization": zero,
        # Our optimizer is a client one: torch.optim (no 60 s FusedAdam build), or DeepSpeed's
        # compiled CPU Adam when offloading on GPUs (strategies/deepspeed.py picks it).
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
    }
    if job.precision.name == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0,  # 0 = dynamic
                       "initial_scale_power": int(math.log2(job.precision.init_scale)),
                       "loss_scale_window": job.precision.growth_interval,
                       # halve on the first overflow, as torch's GradScaler does (DeepSpeed's
                       # default 2 keeps the scale after one)
                       "hysteresis": 1}
    elif job.precision.name == "bf16":
        cfg["bf16"] = {"enabled": True}
    return _merge(cfg, job.parallelism.deepspeed)


class _ReadTracker(dict):
    """A dict that records which top-level keys DeepSpeed's config parser asks about."""

    def __init__(self, data: dict[str, Any], read: set[str]) -> None:
        super().__init__(data)
        self.read = read

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)

    def __copy__(self) -> _ReadTracker:
        return _ReadTracker(dict(self), self.read)


def check(cfg: dict[str, Any], parse: bool = True) -> None:
    """Validate `cfg` with DeepSpeed's own `DeepSpeedConfig` (pydantic models for its sections).
    A top-level key that DeepSpeed's parser never reads is unknown to it, and an error.
    `parse=False` (no `parallelism.deepspeed` passthrough: the config is all generated here)
    only checks that DeepSpeed is installed, without importing it (about 2 s)."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("parallelism.backend", "deepspeed",
                          "'torch' (deepspeed is not installed: run scripts/bootstrap.sh)")
    if not parse:
        return
    from deepspeed.runtime.config import DeepSpeedConfig
    probe = {k: v for k, v in cfg.items() if k != "train_batch_size"}  # needs the real world size
    read: set[str] = set()
    try:
        DeepSpeedConfig(_ReadTracker(probe, read))
    except Exception as e:  # DeepSpeed raises pydantic, assertion and its own errors alike
        # DeepSpeed's message may quote the input: never a secret's value (common/secrets.py)
        raise ConfigError("parallelism.deepspeed", scrub(_first_line(e), secret_values(cfg)),
                          "a config DeepSpeed's config model accepts") from e
    unknown = sorted(set(probe) - read)
    if unknown:
        raise ConfigError(f"parallelism.deepspeed.{unknown[0]}", cfg[unknown[0]],
                          "a key DeepSpeed knows (see its config-json docs)")


def _first_line(e: Exception) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:3]) if lines else type(e).__name__
