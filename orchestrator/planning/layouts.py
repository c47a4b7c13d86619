"""The layout search's candidates (`search.objective=throughput`): every parallel layout of the
ladder (planning/fit.py: DDP, ZeRO-1/2/3, ZeRO-3 x TP, PP, PP x TP, offload) this job can run,
each at every micro batch that divides its per-rank batch (the global batch kept, by gradient
accumulation), crossed with the choices of `search.params` (e.g. activation checkpointing).
`search.layouts` narrows the ladder to the rungs it names.

Each is planned before anything launches; a layout whose per-rank peak exceeds the memory a
rank has (`search.device_memory_mb`, else the planned GPU's, `cluster.gpu`) or that the planner
refuses is dropped with the reason and never launched. Of the survivors, `search.trials` run
(fastest planned step first where the plan has a GPU to time with, else in ladder order), each
as a trial whose value is its measured tokens/s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Optional

from orchestrator.common.errors import ConfigError
from orchestrator.common.plan import Plan
from orchestrator.common.units import human_bytes
from orchestrator.config.schema import JobConfig
from orchestrator.config.search import Param
from orchestrator.planning import fit
from orchestrator.planning.study import at, corners, trial_cost

LABELS = tuple(rung[0] for rung in fit.LADDER)


@dataclasses.dataclass(frozen=True)
class Layout:
    label: str  # e.g. "fsdp_zero3, micro batch 2"
    overrides: dict[str, Any]  # dotted key -> value, where the layout differs from the job
    plan: Plan


def flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (a dict-valued setting, e.g. parallelism.deepspeed, is
    one value)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value and f"{prefix}{key}" != "parallelism.deepspeed":
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _rungs(job: JobConfig, device: str) -> list[tuple[str, JobConfig]]:
    wanted = job.search.layouts
    unknown = [w for w in wanted if w not in LABELS]
    if unknown:
        raise ConfigError("search.layouts", list(wanted), f"names of layouts: {', '.join(LABELS)}"
                          f" (not {', '.join(unknown)})")
    found = [(label, c) for label, c in fit.candidates(job)
             if (not wanted or label in wanted)
             and not (device == "cpu" and c.parallelism.offload_optimizer)]  # no CPU to offload to
    if not found:
        raise ConfigError("search.layouts", list(wanted), "layouts this job can run (none of "
                          "these divides its world size and global batch, or suits its model)")
    return found


def enumerate_layouts(job: JobConfig, space: list[Param], device: str,
                      planner: Callable[[JobConfig], Plan]
                      ) -> tuple[list[Layout], list[dict[str, Any]]]:
    """The layouts that fit, in the order they run, and those refused with why."""
    base = flat(dataclasses.asdict(job))
    limit = int(job.search.device_memory_mb * 2**20) if job.search.device_memory_mb else None
    fitting, refused = [], []
    for rung, candidate in _rungs(job, device):
        for values in corners(space):
            point = at(candidate, values)
            label = ", ".join([rung, f"micro batch {point.train.micro_batch_size}",
                               *(f"{k}={v}" for k, v in values.items())])
            try:
                plan = planner(point)
            except ConfigError as e:
                refused.append({"layout": label, "reason": str(e)})
                continue
            reason = _too_big(plan, limit)
            if reason:
                refused.append({"layout": label, "reason": reason})
                continue
            overrides = {k: v for k, v in flat(dataclasses.asdict(point)).items()
                         if base.get(k) != v}
            fitting.append(Layout(label, overrides, plan))
    if all(f.plan.step_estimate for f in fitting):
        fitting.sort(key=lambda f: f.plan.step_estimate["total_s"])  # type: ignore[index]
    return fitting, refused


def _too_big(plan: Plan, limit: Optional[int]) -> Optional[str]:
    has = limit or plan.device_memory_bytes
    peak = plan.memory.peak_total_bytes
    if has is None or peak <= has:
        return None
    return f"needs {human_bytes(peak)} per rank > {human_bytes(has)}"


def override(key: str, value: Any) -> str:
    """`key=value` as a Hydra override: null, true/false, else the value's own text."""
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
    return f"{key}={text}"


def layout_plan(job: JobConfig, fitting: list[Layout], refused: list[dict[str, Any]]
                ) -> dict[str, Any]:
    """The layout search's plan (`search_plan.json`): the layouts that run (`search.trials` of
    those that fit), one after another, their summed GPU-hours and wall time, and the rest."""
    run = fitting[:job.search.trials]
    rows = [{"layout": f.label, **trial_cost(f.plan, f.overrides)} for f in run]
    if not rows:
        raise ConfigError("search.objective", "throughput", "a layout that fits: every one is "
                          f"refused ({refused[0]['layout']}: {refused[0]['reason']})")
    order = (lambda r: r["gpu_hours"]) if all(r["gpu_hours"] for r in rows) else \
        (lambda r: r["peak_bytes_per_rank"])
    return {
        "trials": len(rows), "parallel": job.search.parallel,
        "corners_planned": len(fitting) + len(refused),
        "trial_min": min(rows, key=order), "trial_max": max(rows, key=order),
        "gpu_hours": _total(rows, "gpu_hours"), "cost_usd": _total(rows, "cost_usd"),
        "wall_time_s": _total(rows, "wall_time_s"),
        "budget_gpu_hours": job.search.budget_gpu_hours, "layouts": rows,
        "not_run": [f.label for f in fitting[len(run):]], "refused": refused,
    }


def _total(rows: list[dict[str, Any]], key: str) -> Optional[float]:
    values = [r[key] for r in rows]
    return None if any(v is None for v in values) else sum(values)


def layout_params(job: JobConfig, layouts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The layouts as trials' parameters: each names every key any layout sets (a trial's
    parameters are one point of the study's space)."""
    base = flat(dataclasses.asdict(job))
    keys = sorted(set().union(*layouts))
    return [{k: layout.get(k, base[k]) for k in keys} for layout in layouts]
