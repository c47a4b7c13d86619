"""Activation memory per rank for one micro batch (Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models", no tensor/sequence parallelism).

Per layer, with 2-byte activations, a transformer block stores about s·b·h·34 bytes for its
linear layers, norms and GELU/SwiGLU inputs, plus 5·a·s²·b bytes for attention scores, softmax
and its dropout mask, which fused attention (SDPA/flash) never materialises. fp32 activations
double the first term. With activation checkpointing only each block's input (s·b·h values)
is kept, plus one block's full activations while it is recomputed. The loss adds the logits
in the compute dtype and their fp32 copy and gradient (s·b·V·(bytes + 8)).

Tensor parallelism with sequence parallelism (the paper's section 4.2.2, always on with TP
here) divides every per-layer term by t: s·b·h·34/t + 5·a·s²·b/t (2-byte activations), and a
checkpointed block's input is one sequence slice (s·b·h/t). The logits stay split by vocabulary
through the loss (`loss_parallel`), so their term is divided by t as well.
"""

from __future__ import annotations

from orchestrator.config.schema import JobConfig

ACT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "bf16_pure": 2, "fp8": 2}  # fp8: bf16 activations


def activation_bytes(job: JobConfig, micro_batch: int | None = None) -> int:
    m, s = job.model, job.data.seq_len
    b = micro_batch if micro_batch is not None else job.train.micro_batch_size
    if job.dpo_beta is not None:  # DPO: chosen and rejected both go through the policy
        b *= 2
    act = ACT_BYTES[job.precision.name]
    stacks = 2 if m.family == "t5" else 1  # encoder and decoder stacks
    t = job.parallelism.tensor_parallel
    linear = 34 * s * b * m.d_model * act // (2 * t)
    scores = 0 if m.attn_implementation == "sdpa" else 5 * m.n_head * s * s * b * act // (2 * t)
    per_layer = linear + scores
    layers = m.n_layer * stacks
    if job.train.activation_checkpointing:
        body = layers * s * b * m.d_model * act // t + per_layer
    else:
        body = layers * per_layer
    logits = s * b * m.vocab_size * (act + 8) // t
    return body + logits
