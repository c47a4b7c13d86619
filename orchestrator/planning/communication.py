"""Bytes one rank sends per optimizer step on each dimension of the device mesh, as ring
collectives move them (what NCCL does for large messages): an all-gather or reduce-scatter whose
whole tensor is B bytes sends (n-1)/n·B from each of the n ranks, an all-reduce twice that.

- `dp` (data parallel): DDP all-reduces the gradients once per step (accumulation micro-steps
  skip it); ZeRO-1 also all-gathers the updated parameters; FSDP2 all-gathers each unit's
  parameters in every micro-step's forward (ZeRO-3: again in backward, except the root it keeps)
  and reduce-scatters the gradients once per step; HSDP adds an all-reduce of each shard's
  gradients across the replicas. Under a pipeline (`specs`: the heaviest stage's), FSDP2
  gathers a stage's units once per step, as the schedule keeps them gathered. DeepSpeed: the
  ZeRO paper's 2Ψ (stages 1/2) and 3Ψ (stage 3).
- `tp` (tensor parallel with sequence parallelism, run/mesh.py's layout), per micro batch: each
  block's attention and MLP all-gather their input sequence and reduce-scatter their output, in
  forward and (as the reverse collectives) in backward: 8 collectives of s·b·h per block, 12 when
  activation checkpointing recomputes the forward; the embedding's all-reduce, the head's
  all-gather of its input, and the reverse collectives of the head's input and of the first
  block's slice in backward: 5·s·b·h more. The logits stay split by vocabulary; the loss
  reduces three values per token across the group (s·b, left out: under 1/h of the rest).
  Activations move in the compute dtype (fp32 runs: 4 bytes).
- `cp` (context parallel, torch's ring attention with its default all-gather rotation), per
  block and micro batch: the whole sequence's keys and values (2·s·b·kv_heads·head_dim) are
  all-gathered in forward, again in backward (and in the recomputed forward under activation
  checkpointing), and their gradients travel the ring once in fp32 (C sends of a 1/C chunk).
- `pp` (pipeline parallel): each stage sends its output activations (s·b·h per micro batch) to
  the next stage and the gradients of its input to the previous one, point to point: s·B·h per
  step each way for the step's batch B; a middle stage sends both.
"""

from __future__ import annotations

from typing import Optional

from orchestrator.config.derived import gradient_ranks, pipeline_stages_per_rank
from orchestrator.config.gpus import GPU
from orchestrator.config.schema import JobConfig
from orchestrator.models.pipeline import stage_blocks
from orchestrator.models.specs import ROOT_GROUP, ParamSpec
from orchestrator.planning.activations import ACT_BYTES
from orchestrator.planning.memory import DTYPE_BYTES, master_bytes


def _ring(n: int) -> float:
    """The share of a collective's whole tensor each of n ranks sends (all-gather or
    reduce-scatter); an all-reduce sends twice this."""
    return (n - 1) / n


def tensor_parallel_bytes(job: JobConfig, accum: int) -> int:
    """`tp` bytes per step (see the module docstring); 0 without tensor parallelism."""
    t = job.parallelism.tensor_parallel
    if t == 1:
        return 0
    m, p = job.model, job.parallelism
    s, b = job.data.seq_len, job.train.micro_batch_size
    per_block = 12 if job.train.activation_checkpointing else 8
    stages = p.pipeline_parallel * pipeline_stages_per_rank(job)  # a rank's blocks
    blocks = max(len(r) for r in stage_blocks(m.n_layer, stages)) * (stages // p.pipeline_parallel)
    elements = s * b * m.d_model * (per_block * blocks + 5)
    return int(accum * _ring(t) * elements * ACT_BYTES[job.precision.name])


def _grad_bytes(job: JobConfig) -> int:
    """Bytes of a gradient element as it is reduced: FSDP2's reduce dtype (precision.reduce_dtype,
    else fp32 master gradients), DDP's parameter dtype."""
    chosen = job.precision.reduce_dtype
    return DTYPE_BYTES[chosen] if chosen not in (None, "auto") else master_bytes(
        job.precision.name)


def data_parallel_bytes(job: JobConfig, specs: list[ParamSpec], accum: int,
                        shard_size: int) -> int:
    """`dp` bytes per step over `specs` (each rank's tensor-parallel slices), with FSDP2
    sharding over `shard_size` ranks and replicating over the rest (HSDP)."""
    p, n = job.parallelism, gradient_ranks(job)
    if n == 1:
        return 0
    total = sum(s.numel for s in specs)
    trained = sum(s.numel for s in specs if s.trainable)
    g = _grad_bytes(job)
    if p.backend == "deepspeed":
        return int((3 if p.zero_stage == 3 else 2) * _ring(n) * total
                   * DTYPE_BYTES[job.precision.name])
    if p.zero_stage in (0, 1):
        gathered = _ring(n) * total * master_bytes(job.precision.name) if p.zero_stage else 0
        return int(2 * _ring(n) * trained * g + gathered)
    shard = shard_size or n
    param = DTYPE_BYTES[job.precision.param_dtype if job.precision.param_dtype != "auto"
                        else job.precision.name]
    root = sum(s.numel for s in specs if s.group == ROOT_GROUP)
    gathers = total + (total - root if p.zero_stage == 3 else 0)  # per micro batch
    if p.pipeline_parallel > 1:  # the schedule keeps a stage's units gathered all step
        accum = 1
    replicas = n // shard
    cross = 2 * _ring(replicas) * trained / shard * g if replicas > 1 else 0
    return int(accum * _ring(shard) * gathers * param + _ring(shard) * trained * g + cross)


def pipeline_parallel_bytes(job: JobConfig, accum: int) -> int:
    """`pp` bytes per step sent by the busiest stage; 0 without pipeline parallelism."""
    stages = job.parallelism.pipeline_parallel
    if stages == 1:
        return 0
    batch = job.train.micro_batch_size * accum
    one_way = job.data.seq_len * batch * job.model.d_model * ACT_BYTES[job.precision.name]
    return one_way * (2 if stages > 2 else 1)


def context_parallel_bytes(job: JobConfig, accum: int) -> int:
    """`cp` bytes per step (see the module docstring); 0 without context parallelism."""
    c, m = job.parallelism.context_parallel, job.model
    if c == 1:
        return 0
    kv = 2 * job.data.seq_len * job.train.micro_batch_size * (m.n_kv_head or m.n_head) * (
        m.d_model // m.n_head)
    gathers = 3 if job.train.activation_checkpointing else 2
    per_block = gathers * _ring(c) * kv * ACT_BYTES[job.precision.name] + kv * 4
    return int(accum * m.n_layer * per_block)


def _spans_nodes(job: JobConfig) -> dict[str, bool]:
    """Whether each dimension's group reaches beyond one node (the mesh is pp x dp x cp x tp,
    outermost first): a group of tp, cp·tp or dp·cp·tp consecutive ranks stays in a node of
    gpus_per_node; pipeline stages are counted across nodes whenever there are several."""
    p, g, several = job.parallelism, job.cluster.gpus_per_node, job.cluster.nodes > 1
    t = p.tensor_parallel
    return {"dp": several and gradient_ranks(job) * t > g, "tp": several and t > g,
            "cp": several and p.context_parallel * t > g, "pp": several}


def step_estimate(job: JobConfig, comm_bytes: dict[str, int], compute_s: Optional[float],
                  bubble: float, gpu: Optional[GPU]) -> Optional[dict[str, float]]:
    """Seconds per step: the compute at the planned MFU, stretched by the pipeline's bubble,
    plus the communication the compute does not hide. Each dimension's bytes move at NVLink's
    (or PCIe's) one-way bandwidth inside a node and `cluster.network_gbps` across nodes. The
    data-parallel collectives overlap the compute (DDP's buckets, FSDP2's and DeepSpeed's
    prefetch), so only what exceeds it counts; tensor-, context- and pipeline-parallel
    transfers sit on the critical path and count whole. An estimate to compare layouts by,
    not a measurement."""
    if compute_s is None or gpu is None:
        return None
    network = job.cluster.network_gbps * 1e9 / 8
    spans = _spans_nodes(job)
    secs = {dim: n / (network if spans[dim] else gpu.link_bytes_per_s)
            for dim, n in comm_bytes.items()}
    stretched = compute_s / (1 - bubble)
    exposed_dp = max(0.0, secs.get("dp", 0.0) - compute_s)
    critical = sum(v for dim, v in secs.items() if dim != "dp")
    return {"compute_s": compute_s, "bubble_s": stretched - compute_s,
            **{f"{dim}_s": v for dim, v in secs.items()}, "dp_exposed_s": exposed_dp,
            "total_s": stretched + exposed_dp + critical}
