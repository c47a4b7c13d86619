"""Training compute: FLOPs (6·N·D plus attention), the Chinchilla reference, time and cost.

FLOPs per token = 6·N (forward 2N + backward 4N over the weights) + 12·L·h·s for attention
scores and values (PaLM appendix B); with frozen weights (LoRA) backward still computes the
activation gradients (2N) but weight gradients only for the T trainable ones: 4·N + 2·T.
DPO runs both answers of a pair through the policy and, forward only, through the frozen
reference: 2·(4N + 2T + 12·L·h·s + 2N + 4·L·h·s) per token of a pair.
D tokens in all. Chinchilla (Hoffmann et al. 2022):
compute-optimal training uses about 20 tokens per parameter, so a budget C = 6·N·D gives
N* = sqrt(C / 120) and D* = 20·N*.
"""

from __future__ import annotations

import math
from typing import Optional

from orchestrator.common.plan import ComputeEstimate

CHINCHILLA_TOKENS_PER_PARAM = 20
AT_OPTIMUM_BAND = 0.10  # within ±10 % of 20 tokens/param counts as "at" the optimum


def chinchilla_optimum(budget_flops: float) -> tuple[int, int]:
    """(N*, D*) minimising loss for a training budget C ≈ 6·N·D with D = 20·N."""
    n = math.sqrt(budget_flops / (6 * CHINCHILLA_TOKENS_PER_PARAM))
    return int(n), int(CHINCHILLA_TOKENS_PER_PARAM * n)


def verdict(ratio: float) -> str:
    if abs(ratio - 1) <= AT_OPTIMUM_BAND:
        return f"at the Chinchilla optimum ({ratio:.2f}x)"
    if ratio < 1:
        return f"under the Chinchilla optimum by {1 / ratio:.1f}x"
    return f"over the Chinchilla optimum by {ratio:.1f}x"


def estimate(params: int, global_batch: int, seq_len: int, steps: int, layers: int,
             d_model: int, world_size: int = 1, peak_flops: Optional[float] = None,
             mfu: Optional[float] = None, budget_flops: Optional[float] = None,
             gpu_hour_usd: Optional[float] = None,
             trainable_params: Optional[int] = None,
             reference: bool = False, extra_flops_per_token: float = 0.0,
             lookup_params: int = 0, trainable_lookup_params: int = 0) -> ComputeEstimate:
    """Training FLOPs and time; `extra_flops_per_token`: work besides the matmuls (QAT's fake
    quantization, quantization/int8.py: qat_overhead). `lookup_params`: embedding weights that
    are not also the output head (an untied input embedding, GPT-2's positions): a lookup,
    charged no matmul FLOPs (torchtitan and PaLM appendix B count 6·(N − embeddings)); the
    Chinchilla reference keeps every parameter."""
    tokens_per_step = global_batch * seq_len
    tokens = tokens_per_step * steps
    trained = params if trainable_params is None else trainable_params
    matmul, trained_matmul = params - lookup_params, trained - trainable_lookup_params
    attention = 4.0 * layers * d_model * seq_len  # forward; backward is twice that
    per_token = 4.0 * matmul + 2.0 * trained_matmul + 3 * attention
    if reference:  # DPO: chosen and rejected, each also through the reference (forward)
        per_token = 2 * (per_token + 2.0 * matmul + attention)
    per_token += extra_flops_per_token
    chinchilla = CHINCHILLA_TOKENS_PER_PARAM * params
    ratio = tokens / chinchilla
    optimum = chinchilla_optimum(budget_flops) if budget_flops else (None, None)
    step_time = wall = gpu_hours = cost = None
    if peak_flops and mfu:
        step_time = per_token * tokens_per_step / (world_size * peak_flops * mfu)
        wall = step_time * steps
        gpu_hours = wall * world_size / 3600
        cost = gpu_hours * gpu_hour_usd if gpu_hour_usd is not None else None
    return ComputeEstimate(
        params=params, trainable_params=trainable_params, reference=reference,
        tokens_per_step=tokens_per_step,
        tokens=tokens,
        flops_per_token=per_token, flops=per_token * tokens, chinchilla_tokens=chinchilla,
        tokens_vs_chinchilla=ratio, chinchilla_verdict=verdict(ratio),
        budget_flops=budget_flops, optimal_params=optimum[0], optimal_tokens=optimum[1],
        peak_flops_per_device=peak_flops, mfu=mfu if peak_flops else None,
        step_time_s=step_time, wall_time_s=wall, gpu_hours=gpu_hours, cost_usd=cost,
    )
