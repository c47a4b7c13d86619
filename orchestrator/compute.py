"""Training compute: parameters, tokens and FLOPs (6·N·D), and the Chinchilla reference."""

from __future__ import annotations

from dataclasses import dataclass

CHINCHILLA_TOKENS_PER_PARAM = 20


@dataclass(frozen=True)
class ComputeEstimate:
    params: int  # unique trainable parameters (tied embeddings counted once)
    tokens_per_step: int
    tokens: int  # D: tokens the job will train on
    flops: float  # 6 · N · D
    chinchilla_tokens: int  # ≈ 20 tokens per parameter
    tokens_vs_chinchilla: float  # D / chinchilla_tokens (1.0 = compute-optimal)


def estimate(params: int, global_batch: int, seq_len: int, steps: int) -> ComputeEstimate:
    tokens_per_step = global_batch * seq_len
    tokens = tokens_per_step * steps
    chinchilla = CHINCHILLA_TOKENS_PER_PARAM * params
    return ComputeEstimate(
        params=params,
        tokens_per_step=tokens_per_step,
        tokens=tokens,
        flops=6.0 * params * tokens,
        chinchilla_tokens=chinchilla,
        tokens_vs_chinchilla=tokens / chinchilla,
    )
