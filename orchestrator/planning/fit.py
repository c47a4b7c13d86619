"""Will it fit? Refuse a run whose per-rank peak exceeds the planned GPU's memory, naming the
cheapest setting that would fit; and `parallelism.auto`, which picks that setting itself.

The ladder follows the seed lecture's rule of thumb: DDP while the model fits one device, then
ZeRO-1, ZeRO-2, ZeRO-3 (each shards more and communicates more), then ZeRO-3 over tensor
parallelism of 2, 4, 8 ranks inside a node (Llama family: TP divides the activations and the
unit FSDP gathers, at the price of collectives in every layer), then pipelines (ZeRO-2 over each
stage's ranks, alone or over TP 8), then ZeRO-3 with optimizer and parameter offload to CPU
memory (DeepSpeed). Within a rung the largest micro batch that fits
wins (the global batch is kept by raising gradient accumulation). A run too big for its GPU is
told the cheapest rung that fits; `parallelism.auto` takes, of the rungs that fit, the one with
the shortest estimated step, so a layout that fits but moves less over the network (TP inside
the node instead of FSDP across nodes) wins over a cheaper rung.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from orchestrator.common.errors import ConfigError
from orchestrator.common.plan import Plan
from orchestrator.common.units import human_bytes
from orchestrator.config.derived import data_parallel_size
from orchestrator.config.schema import JobConfig
from orchestrator.planning.mesh import check_mesh

MakePlan = Callable[[JobConfig], Plan]

LADDER = (  # (label, backend, zero_stage, offload, tensor_parallel, pipeline_parallel)
    ("ddp", "torch", 0, False, 1, 1),
    ("zero1", "torch", 1, False, 1, 1),
    ("fsdp_zero2", "torch", 2, False, 1, 1),
    ("fsdp_zero3", "torch", 3, False, 1, 1),
    ("fsdp_zero3 x tp 2", "torch", 3, False, 2, 1),
    ("fsdp_zero3 x tp 4", "torch", 3, False, 4, 1),
    ("fsdp_zero3 x tp 8", "torch", 3, False, 8, 1),
    # pipelines (Llama): ZeRO-2 over each stage's data-parallel ranks (replicated when a stage
    # has none), alone or over TP 8 inside each node
    *((f"pp {pp}", "torch", 2, False, 1, pp) for pp in (2, 4, 8)),
    *((f"pp {pp} x tp 8", "torch", 2, False, 8, pp) for pp in (2, 4, 8, 16)),
    ("deepspeed_zero3_offload", "deepspeed", 3, True, 1, 1),
)


def _global_batch(job: JobConfig) -> int:
    """The configured global batch, which every candidate keeps."""
    return job.train.global_batch_size or (job.train.micro_batch_size
                                           * (job.train.grad_accum_steps or 1)
                                           * data_parallel_size(job))


def _variant(job: JobConfig, backend: str, stage: int, offload: bool, tp: int, pp: int,
             micro: int) -> JobConfig:
    if pp > 1 and job.world_size == pp * tp:
        stage = 0  # no data-parallel ranks beside the pipeline: nothing to shard over
    # replicate_degree (HSDP / hpZ) is kept where the rung supports it, else 1 (plain DP)
    hsdp = stage in ((3,) if backend == "deepspeed" else (2, 3))
    par = dataclasses.replace(job.parallelism, backend=backend, zero_stage=stage,
                              offload_optimizer=offload, offload_params=offload, auto=False,
                              replicate_degree=job.parallelism.replicate_degree if hsdp else 1,
                              tensor_parallel=tp, pipeline_parallel=pp)
    train = dataclasses.replace(job.train, micro_batch_size=micro,
                                global_batch_size=_global_batch(job), grad_accum_steps=None)
    return dataclasses.replace(job, parallelism=par, train=train)


def _micro_batches(total: int, data_parallel: int) -> list[int]:
    """Divisors of the per-rank batch, largest first."""
    per_rank = total // data_parallel
    return [m for m in range(per_rank, 0, -1) if per_rank % m == 0]


def _allowed(job: JobConfig, candidate: JobConfig) -> bool:
    """Whether a rung can run this job at all: DeepSpeed not with bf16_pure; a TP rung only
    where its layout's rules hold (planning/mesh.py) and it divides the global batch."""
    p = candidate.parallelism
    if p.backend == "deepspeed":
        return job.precision.name != "bf16_pure"
    try:
        check_mesh(candidate)
    except ConfigError:
        return False
    return _global_batch(job) % data_parallel_size(candidate) == 0


def _rungs(job: JobConfig) -> Iterator[tuple[str, tuple[str, int, bool, int, int], JobConfig]]:
    """The ladder's rungs this job can run: (label, rung, the rung at micro batch 1)."""
    for label, *rung in LADDER:
        first = _variant(job, *rung, 1)
        if _allowed(job, first):
            yield label, tuple(rung), first


def candidates(job: JobConfig) -> Iterator[tuple[str, JobConfig]]:
    """Each rung this job can run at each micro batch dividing its per-rank batch (largest
    first), the global batch kept: (the rung's label, the job under it)."""
    for label, rung, first in _rungs(job):
        for micro in _micro_batches(_global_batch(job), data_parallel_size(first)):
            yield label, _variant(job, *rung, micro)


def cheapest_fit(job: JobConfig, make_plan: MakePlan) -> tuple[str, JobConfig, Plan] | None:
    for label, candidate in candidates(job):
        plan = make_plan(candidate)
        if plan.fits:
            return label, candidate, plan
    return None


def _fitting(job: JobConfig, make_plan: MakePlan) -> list[tuple[str, JobConfig, Plan]]:
    """Every rung that fits, each with the largest micro batch that does, in ladder order."""
    found: dict[str, tuple[str, JobConfig, Plan]] = {}
    for label, candidate in candidates(job):
        if label not in found:
            plan = make_plan(candidate)
            if plan.fits:
                found[label] = (label, candidate, plan)
    return list(found.values())


def _seconds(plan: Plan) -> float:
    return plan.step_estimate["total_s"] if plan.step_estimate else float("inf")


def choose(job: JobConfig, make_plan: MakePlan) -> tuple[JobConfig, str]:
    """`parallelism.auto`: of the rungs that fit (each at its largest micro batch), the one
    with the shortest estimated step (compute plus the communication it does not hide:
    planning/communication.py), the cheaper rung on a tie; and why."""
    if job.cluster.gpu == "none":
        raise ConfigError("parallelism.auto", True,
                          "false unless cluster.gpu names the device to fit (e.g. h100)")
    fitting = _fitting(job, make_plan)
    if not fitting:
        raise ConfigError("parallelism.auto", True, "a job that fits somewhere: nothing fits "
                          f"{job.cluster.gpu} even with ZeRO-3 (over tensor parallelism, or "
                          "with CPU offload) and micro batch 1")
    # CPU offload is the last resort: its host transfers and CPU optimizer are not estimated
    on_device = [f for f in fitting if not f[1].parallelism.offload_optimizer] or fitting
    label, chosen, plan = min(on_device, key=lambda f: _seconds(f[2]))  # first of equals
    fit_labels = {name for name, *_ in fitting}
    too_big = [name for name, *_ in _rungs(job) if name not in fit_labels]
    others = sorted((f for f in on_device if f[0] != label), key=lambda f: _seconds(f[2]))
    reason = (f"{label} with micro batch {chosen.train.micro_batch_size} needs "
              f"{human_bytes(plan.memory.peak_total_bytes)} of "
              f"{human_bytes(plan.device_memory_bytes or 0)} per GPU")
    if plan.step_estimate:
        reason += f", about {_seconds(plan):.3g} s/step"
    if others and plan.step_estimate:
        reason += "; slower: " + ", ".join(f"{n} {_seconds(p):.3g} s" for n, _, p in others[:3])
    if too_big:
        reason += f"; would not fit: {', '.join(too_big)}"
    return chosen, reason


def refuse_if_too_big(job: JobConfig, plan: Plan, make_plan: MakePlan) -> None:
    """For action=run: a plan that does not fit its GPU stops here, with both numbers."""
    if plan.fits is not False:
        return
    found = cheapest_fit(job, make_plan)
    hint = (f"{found[0]} with micro batch {found[1].train.micro_batch_size} fits at "
            f"{human_bytes(found[2].memory.peak_total_bytes)} (or set parallelism.auto=true)"
            if found else "nothing fits, even ZeRO-3 over tensor parallelism or with CPU "
            "offload at micro batch 1")
    raise ConfigError(
        "parallelism", f"{plan.strategy} ZeRO-{plan.zero_stage}",
        f"a setting that fits: needs {human_bytes(plan.memory.peak_total_bytes)}/GPU > "
        f"{human_bytes(plan.device_memory_bytes or 0)} ({job.cluster.gpu}); {hint}")
