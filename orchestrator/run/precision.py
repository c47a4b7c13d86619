"""Precision policies: autocast for replicated strategies, FSDP2 `MixedPrecisionPolicy` for
sharded ones, and dynamic loss scaling for fp16. Master weights and optimizer state stay fp32,
except `bf16_pure`, where the model itself is bf16 (and so are its grads and Adam moments).
`fp8` is bf16 mixed precision whose linear layers are torchao `Float8Linear`s
(orchestrator/quantization/fp8.py)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "bf16_pure": torch.bfloat16, "fp8": torch.bfloat16}  # the compute dtype
MIXED = ("bf16", "fp16", "fp8")


def model_dtype(precision: str) -> torch.dtype:
    """The dtype the model's own weights are kept in."""
    return torch.bfloat16 if precision == "bf16_pure" else torch.float32


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager[Any]:
    if precision not in MIXED:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[precision])


def fsdp_policy(precision: str, param_dtype: str = "auto", reduce_dtype: str = "auto") -> Any:
    """Compute in the low-precision dtype; reduce gradients in fp32 for stable accumulation
    (`precision.param_dtype` / `precision.reduce_dtype` override either; auto keeps these)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mixed = precision in MIXED
    param = DTYPES[param_dtype] if param_dtype != "auto" else (DTYPES[precision] if mixed
                                                               else None)
    reduce = DTYPES[reduce_dtype] if reduce_dtype != "auto" else (torch.float32 if mixed
                                                                  else None)
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)


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


def loss_scale_metrics(scaler: Any, optimizer: torch.optim.Optimizer, steps: int
                       ) -> dict[str, float]:
    """fp16: the scaler's current `loss_scale` and `overflow_steps`, the steps it skipped so
    far: of `steps` optimizer steps taken, those the optimizer did not count (GradScaler skips
    `optimizer.step()` on an inf/NaN gradient; torch's optimizers count their own steps in
    `state[p]["step"]`, which a checkpoint restores with them). Read on logged steps only."""
    # the largest count (a parameter without a gradient in some step lags), read in one
    # transfer: a fused optimizer keeps its counts on the device
    counts = [torch.as_tensor(s["step"]) for s in optimizer.state.values() if "step" in s]
    counted = int(torch.stack(counts).max()) if counts else 0
    return {"loss_scale": float(scaler.get_scale()), "overflow_steps": float(steps - counted)}
