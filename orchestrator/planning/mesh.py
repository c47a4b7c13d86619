"""What must divide what on the device mesh (run/mesh.py): stages x replicas x shard group x
tensor-parallel degree = the world size (the shard group holding the context-parallel ranks),
checked on the typed job alone (and, for context parallelism, its device). One line each, naming
the key, the value and what is allowed.
"""

from __future__ import annotations

from orchestrator.common.errors import ConfigError
from orchestrator.config.derived import (
    MULTI_STAGE_SCHEDULES,
    data_parallel_size,
    gradient_ranks,
    pipeline_microbatches,
    pipeline_stages_per_rank,
    resolve_batch,
)
from orchestrator.config.rules import positive
from orchestrator.config.schema import JobConfig
from orchestrator.models.pipeline import FAMILIES as PIPELINE_FAMILIES
from orchestrator.models.tensor_parallel import PLANS

TP_KEY = "parallelism.tensor_parallel"
PP_KEY = "parallelism.pipeline_parallel"
CP_KEY = "parallelism.context_parallel"
STAGES_KEY = "parallelism.pipeline_stages_per_rank"
CP_FAMILIES = ("llama",)  # ring attention's sharded positions: rotary, not learned


def check_mesh(job: JobConfig) -> None:
    """The pipeline and tensor-parallel degrees, then the replicas of the data-parallel ranks
    left."""
    _check_pipeline(job)
    _check_tensor_parallel(job)
    _check_context_parallel(job)
    _check_replicas(job)


def check_context_parallel_device(job: JobConfig, device: str) -> None:
    """Ring attention needs fused attention kernels: CUDA only."""
    c = job.parallelism.context_parallel
    if c > 1 and device != "cuda":
        raise ConfigError(CP_KEY, c, f"1 on {device} (ring attention runs on CUDA's fused SDPA "
                          "kernels, flash, memory-efficient or cuDNN; torch has no "
                          "context-parallel path for CPU attention)")


def _check_context_parallel(job: JobConfig) -> None:
    """C ranks split each sequence: FSDP2 reduces gradients over them (ZeRO-2/3), every rank
    gets a head and a tail chunk of each sequence (torch's load balancer), attention is SDPA."""
    p, c, m = job.parallelism, job.parallelism.context_parallel, job.model
    positive(CP_KEY, c)
    if c == 1:
        return
    if job.world_size % c:
        raise ConfigError(CP_KEY, c, f"a divisor of the world size {job.world_size}")
    if m.family not in CP_FAMILIES:
        raise ConfigError(CP_KEY, c, f"1 for model.family={m.family} (context parallelism is "
                          f"built for: {', '.join(CP_FAMILIES)})")
    others = [(TP_KEY, p.tensor_parallel), (PP_KEY, p.pipeline_parallel)]
    for key, n in others:
        if n > 1:
            raise ConfigError(key, n, f"1 with {CP_KEY}={c} (not built yet)")
    if p.backend == "deepspeed" or p.zero_stage not in (2, 3):
        key, value = (("parallelism.backend", p.backend) if p.backend == "deepspeed"
                      else ("parallelism.zero_stage", p.zero_stage))
        raise ConfigError(key, value, f"torch with zero_stage 2 or 3 with {CP_KEY}={c} "
                          "(FSDP2 reduces each sequence's gradients over its ranks)")
    if job.data.seq_len % (2 * c):
        raise ConfigError("data.seq_len", job.data.seq_len, f"a multiple of 2 x {CP_KEY} = "
                          f"{2 * c} (each rank holds a head and a tail chunk of every sequence)")
    if m.attn_implementation != "sdpa":
        raise ConfigError("model.attn_implementation", m.attn_implementation, f"'sdpa' with "
                          f"{CP_KEY}={c} (ring attention replaces SDPA)")
    _check_not_yet(job, CP_KEY, c, "context")


def _check_pipeline(job: JobConfig) -> None:
    p, n = job.parallelism, job.parallelism.pipeline_parallel
    positive(PP_KEY, n)
    if n == 1:
        return
    if job.world_size % (n * p.tensor_parallel):
        per = (f" / {TP_KEY} {p.tensor_parallel}" if p.tensor_parallel > 1 else "")
        raise ConfigError(PP_KEY, n, f"a divisor of the world size {job.world_size}{per} "
                          "(nodes x gpus_per_node; each stage runs on world / pipeline_parallel "
                          "ranks)")
    if p.tensor_parallel > 1 and pipeline_stages_per_rank(job) > 1:
        raise ConfigError(TP_KEY, p.tensor_parallel, f"1 with pipeline_schedule="
                          f"{p.pipeline_schedule} (several stages per rank split over "
                          "tensor-parallel groups are not built yet)")
    if p.tensor_parallel > 1 and job.model.attn_implementation != "sdpa":
        raise ConfigError("model.attn_implementation", job.model.attn_implementation,
                          f"'sdpa' with {PP_KEY}={n} and {TP_KEY}={p.tensor_parallel} (stages "
                          "pass sequence slices: only causal SDPA needs no mask of them)")
    if job.model.family not in PIPELINE_FAMILIES:
        raise ConfigError(PP_KEY, n, f"1 for model.family={job.model.family} (pipeline "
                          f"parallelism is built for: {', '.join(PIPELINE_FAMILIES)})")
    v = _check_stages_per_rank(job)
    if n * v > job.model.n_layer:
        raise ConfigError(PP_KEY, n, f"at most model.n_layer={job.model.n_layer} / "
                          f"{v} stages per rank (each stage holds whole blocks)")
    micro = pipeline_microbatches(job)
    if micro < n:
        raise ConfigError("parallelism.pipeline_microbatches", micro, f"at least "
                          f"{PP_KEY}={n} (with fewer, some stage is idle all step)")
    rounds = max(1, micro // n)
    if v > 1 and micro % rounds:
        raise ConfigError("parallelism.pipeline_microbatches", micro, f"a multiple of {rounds} "
                          f"with {PP_KEY}={n} and {v} stages per rank (the interleaved "
                          "schedule runs them in equal rounds)")
    batch = job.train.micro_batch_size * resolve_batch(job)[0]
    if batch % micro:
        raise ConfigError("parallelism.pipeline_microbatches", micro, "a divisor of the batch "
                          f"each step runs through the pipeline (micro_batch_size x "
                          f"grad_accum_steps = {batch})")
    _check_pipeline_data_parallel(job, n)
    _check_not_yet(job, PP_KEY, n, "pipeline")


def _check_stages_per_rank(job: JobConfig) -> int:
    """V: at least 2 for an interleaved schedule, 1 for the others."""
    p, v = job.parallelism, pipeline_stages_per_rank(job)
    positive(STAGES_KEY, v)
    multi = p.pipeline_schedule in MULTI_STAGE_SCHEDULES
    if multi and v < 2:
        raise ConfigError(STAGES_KEY, v, f"at least 2 with pipeline_schedule="
                          f"{p.pipeline_schedule} (it interleaves several stages per rank)")
    if p.pipeline_schedule == "zbv" and v != 2:
        raise ConfigError(STAGES_KEY, v, "2 with pipeline_schedule=zbv (its V shape places "
                          "exactly two stages on each rank)")
    if not multi and v > 1:
        raise ConfigError(STAGES_KEY, v, f"1 with pipeline_schedule={p.pipeline_schedule} "
                          "(one stage per rank; interleaved_1f1b, interleaved_zb and zbv run "
                          "several)")
    if v > 1 and p.zero_stage:
        raise ConfigError("parallelism.zero_stage", p.zero_stage, f"0 with {STAGES_KEY}={v} "
                          "(FSDP2 over several stages per rank is not built yet)")
    return v


def _check_pipeline_data_parallel(job: JobConfig, n: int) -> None:
    """Each stage's data-parallel ranks: DDP (zero_stage 0) or FSDP2 ZeRO-2 over them."""
    p = job.parallelism
    if p.backend == "deepspeed":
        raise ConfigError("parallelism.backend", p.backend, f"torch with {PP_KEY}={n} "
                          "(DeepSpeed's pipeline engine needs its own model class; stages run on "
                          "torch.distributed.pipelining)")
    if p.zero_stage == 1:
        raise ConfigError("parallelism.zero_stage", 1, f"0 or 2 with {PP_KEY}={n} (ZeRO-1 "
                          "across a stage's data-parallel ranks is not built; ZeRO-2 also "
                          "shards the optimizer state)")
    if p.zero_stage == 3:
        raise ConfigError("parallelism.zero_stage", 3, f"0 or 2 with {PP_KEY}={n} (the "
                          "pipeline schedule keeps each stage's parameters gathered from its "
                          "first micro-batch to its last, so ZeRO-3 would hold what ZeRO-2 "
                          "holds and gather them more often)")


def _check_replicas(job: JobConfig) -> None:
    """HSDP: R replicas of a parameter sharding over dp/R ranks (FSDP2 stages 2/3, or
    DeepSpeed stage 3's hierarchical partition)."""
    r, p = job.parallelism.replicate_degree, job.parallelism
    positive("parallelism.replicate_degree", r)
    dp = gradient_ranks(job)
    if dp % r:
        alone = p.tensor_parallel == 1 and p.pipeline_parallel == 1
        what = "the world size" if alone else "the data-parallel size"
        raise ConfigError("parallelism.replicate_degree", r, f"a divisor of {what} {dp} "
                          "(replicas x shard group x tensor_parallel = nodes x gpus_per_node)")
    stages = (3,) if p.backend == "deepspeed" else (2, 3)
    if r > 1 and p.zero_stage not in stages:
        raise ConfigError("parallelism.replicate_degree", r, "1 unless parallelism.zero_stage "
                          f"is {' or '.join(map(str, stages))} with backend={p.backend} "
                          "(HSDP shards parameters within a group and replicates across groups)")


def _check_tensor_parallel(job: JobConfig) -> None:
    p, t = job.parallelism, job.parallelism.tensor_parallel
    positive(TP_KEY, t)
    if t == 1:
        return
    if job.world_size % t:
        raise ConfigError(TP_KEY, t, f"a divisor of the world size {job.world_size} (nodes x "
                          "gpus_per_node; the data-parallel size is world / tensor_parallel)")
    if job.model.family not in PLANS:
        raise ConfigError(TP_KEY, t, f"1 for model.family={job.model.family} (tensor "
                          f"parallelism is built for: {', '.join(PLANS)})")
    _check_splits(job, t)
    g = job.cluster.gpus_per_node
    if job.cluster.nodes > 1 and g % t and not p.tp_across_nodes:
        raise ConfigError(TP_KEY, t, f"a divisor of cluster.gpus_per_node={g}, so that a "
                          "tensor-parallel group stays inside a node (it communicates in every "
                          "layer), or set parallelism.tp_across_nodes=true")
    if p.backend == "deepspeed":
        raise ConfigError(TP_KEY, t, "1 with parallelism.backend=deepspeed (DeepSpeed's "
                          "tensor parallelism is AutoTP for inference; tensor-parallel training "
                          "runs on torch's device mesh: backend=torch)")
    dp = data_parallel_size(job)
    if dp > 1 and p.zero_stage not in (2, 3):
        raise ConfigError("parallelism.zero_stage", p.zero_stage, f"2 or 3 with {TP_KEY}={t} "
                          f"and {dp} data-parallel ranks (FSDP2 shards over the data-parallel "
                          "dimension of the device mesh; DDP across tensor-parallel groups is "
                          "not built)")
    _check_not_yet(job, TP_KEY, t, "tensor")


def _check_splits(job: JobConfig, t: int) -> None:
    """Every rank holds whole heads, an equal share of the MLP and of the vocabulary, and an
    equal slice of each sequence (sequence parallelism)."""
    m = job.model
    sizes = [("model.n_head", m.n_head, "each rank computes whole attention heads"),
             ("model.n_kv_head", m.n_kv_head or m.n_head, "each rank holds whole KV heads"),
             ("model.d_ff", m.d_ff, "the MLP's columns split evenly"),
             ("model.vocab_size", m.vocab_size, "the embedding and head split by vocabulary"),
             ("data.seq_len", job.data.seq_len, "sequence parallelism splits each sequence")]
    for key, n, why in sizes:
        if n is not None and n % t:
            raise ConfigError(TP_KEY, t, f"a divisor of {key}={n} ({why})")


def _check_not_yet(job: JobConfig, key: str, t: int, what: str) -> None:
    """Combinations tensor, pipeline or context parallelism does not run with yet: refused,
    never ignored (compile: tensor parallelism only)."""
    pr, tr = job.precision, job.train
    if tr.compile and key != TP_KEY:
        raise ConfigError("train.compile", True, f"false with {key}={t} ({what} parallelism "
                          "runs eager; tensor parallelism alone takes train.compile)")
    refused = [("train.task", tr.task, tr.task != "pretrain"),
               ("lora.rank", job.lora.rank, job.lora.rank > 0),
               ("objective.name", "dpo", job.dpo_beta is not None),
               ("precision.name", pr.name, pr.name in ("fp16", "fp8")),
               ("precision.qat", pr.qat, pr.qat != "none")]
    for name, value, on in refused:
        if on:
            raise ConfigError(name, value, f"not with {key}={t} yet ({what} parallelism "
                              "trains pretrain/SFT jobs in fp32, bf16 or bf16_pure, without "
                              "LoRA, DPO or QAT)")
