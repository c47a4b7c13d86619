"""Precision policies: autocast for replicated strategies, FSDP2 `MixedPrecisionPolicy` for
sharded ones, and dynamic loss scaling for fp16. Master weights and optimizer state stay fp32,
except `bf16_pure`, where the model itself is bf16 (and so are its grads and Adam moments)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "bf16_pure": torch.bfloat16}
MIXED = ("bf16", "fp16")


def model_dtype(precision: str) -> torch.dtype:
    """The dtype the model's own weights are kept in."""
    return torch.bfloat16 if precision == "bf16_pure" else torch.float32


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager[Any]:
    if precision not in MIXED:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[precision])


def fsdp_policy(precision: str) -> Any:
    """Compute in the low-precision dtype; reduce gradients in fp32 for stable accumulation."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision not in MIXED:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)


def grad_scaler(precision: str, device_type: str, sharded: bool, init_scale: float,
                growth_interval: int) -> Any:
    """A dynamic loss scaler for fp16 (sharded-aware under FSDP); None otherwise."""
    if precision != "fp16":
        return None
    kwargs = {"init_scale": init_scale, "growth_interval": growth_interval}
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device=device_type, **kwargs)
    return torch.amp.GradScaler(device_type, **kwargs)
