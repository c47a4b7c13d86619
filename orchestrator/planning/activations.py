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

Context parallelism splits each sequence over c ranks, so every term (all linear in s: it
needs fused attention) is that of a sequence s/c long; the ring attention adds, one layer at a
time, the whole sequence's keys and values all-gathered (2·s·b·kv_heads·head_dim).
"""

from __future__ import annotations

from orchestrator.config.derived import pipeline_stages_per_rank
from orchestrator.config.schema import JobConfig
from orchestrator.models.pipeline import rank_of_stage, stage_blocks, stages_of_rank

ACT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "bf16_pure": 2, "fp8": 2}  # fp8: bf16 activations


def activation_bytes(job: JobConfig, micro_batch: int | None = None) -> int:
    """One micro batch's activations on a rank holding every block (pipeline parallelism:
    `pipeline_activation_bytes`)."""
    m = job.model
    b = micro_batch if micro_batch is not None else job.train.micro_batch_size
    if job.dpo_beta is not None:  # DPO: chosen and rejected both go through the policy
        b *= 2
    layers = m.n_layer * (2 if m.family == "t5" else 1)  # encoder and decoder stacks
    kept, recomputed = _blocks_bytes(job, b, layers)
    return kept + recomputed + _logits_bytes(job, b) + _ring_kv_bytes(job, b)


def _seq(job: JobConfig) -> int:
    """The tokens of each sequence one rank holds: s / context_parallel."""
    return job.data.seq_len // job.parallelism.context_parallel


def _ring_kv_bytes(job: JobConfig, b: int) -> int:
    """Context parallelism: one layer's keys and values of the whole sequence, gathered."""
    m = job.model
    if job.parallelism.context_parallel == 1:
        return 0
    kv_dim = (m.n_kv_head or m.n_head) * (m.d_model // m.n_head)
    return 2 * job.data.seq_len * b * kv_dim * ACT_BYTES[job.precision.name]


def _per_layer_bytes(job: JobConfig, b: int) -> int:
    m, s, t = job.model, _seq(job), job.parallelism.tensor_parallel
    act = ACT_BYTES[job.precision.name]
    linear = 34 * s * b * m.d_model * act // (2 * t)
    scores = 0 if m.attn_implementation == "sdpa" else 5 * m.n_head * s * s * b * act // (2 * t)
    return linear + scores


def _blocks_bytes(job: JobConfig, b: int, layers: int) -> tuple[int, int]:
    """(kept until backward, one block's recomputation) for `layers` blocks of micro batch b."""
    per_layer = _per_layer_bytes(job, b)
    if not job.train.activation_checkpointing:
        return layers * per_layer, 0
    act, t = ACT_BYTES[job.precision.name], job.parallelism.tensor_parallel
    return layers * _seq(job) * b * job.model.d_model * act // t, per_layer


def _logits_bytes(job: JobConfig, b: int) -> int:
    act, t = ACT_BYTES[job.precision.name], job.parallelism.tensor_parallel
    return _seq(job) * b * job.model.vocab_size * (act + 8) // t


def _in_flight(job: JobConfig, rank: int, microbatches: int) -> int:
    """Stage-micro-batches pipeline rank `rank` holds at most, from torch's schedules: GPipe
    every micro-batch; 1F1B P - r; the interleaved ones their warm-up, (V - 1)·M/rounds plus
    2·(P - 1 - r) (1F1B) or P - 1 - r (zero bubble) stage-forwards, then one more before each
    backward; zbv its V-shaped warm-up, 3P - r - 1 forwards before its first backward."""
    p = job.parallelism
    ranks, v, kind = p.pipeline_parallel, pipeline_stages_per_rank(job), p.pipeline_schedule
    if kind == "gpipe":
        return microbatches
    if v == 1:
        return min(ranks - rank, microbatches)
    if kind == "zbv":
        return min(3 * ranks - rank - 1, v * microbatches)
    per_round = microbatches // max(1, microbatches // ranks)
    hops = (2 if kind == "interleaved_1f1b" else 1) * (ranks - 1 - rank)
    return min((v - 1) * per_round + hops + 1, v * microbatches)


def pipeline_activation_bytes(job: JobConfig, batch: int, microbatches: int) -> int:
    """The most any pipeline rank holds: the stage-micro-batches it has in flight
    (`_in_flight`) times one micro-batch's activations of a stage's blocks, plus the logits on
    the rank of the last stage; `batch` is the step's, split in `microbatches`. (The zero-bubble
    schedules also keep each deferred weight gradient's inputs until it runs: not counted.)"""
    p = job.parallelism
    ranks, b = p.pipeline_parallel, batch // microbatches
    v = pipeline_stages_per_rank(job)
    split = stage_blocks(job.model.n_layer, ranks * v)
    last_rank = rank_of_stage(ranks * v - 1, ranks, v, p.pipeline_schedule)
    worst = 0
    for r in range(ranks):
        held = stages_of_rank(r, ranks, v, p.pipeline_schedule)
        in_flight = _in_flight(job, r, microbatches)
        kept, recomputed = _blocks_bytes(job, b, max(len(split[k]) for k in held))
        last = _logits_bytes(job, b) * min(in_flight, microbatches) if r == last_rank else 0
        worst = max(worst, in_flight * kept + last + recomputed)
    return worst
