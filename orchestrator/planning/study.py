"""A search's plan before anything launches (`search_plan.json`): what one trial costs, planned
at the corners of the space (each choice, each interval's ends) because a trial's cost depends
on its parameters (micro batch, steps, layout); the study's total is `search.trials` times the
costliest corner, an upper bound. `search.budget_gpu_hours` refuses a study whose bound is over
it. GPU-hours and cost come from each corner's own plan (`cluster.gpu`, `plan.mfu`,
`cluster.gpu_hour_usd`), as `action=plan` prints them for a run.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any, Optional

from orchestrator.common.errors import ConfigError
from orchestrator.common.plan import Plan
from orchestrator.config.load import to_job
from orchestrator.config.schema import JobConfig
from orchestrator.config.search import Param

MAX_CORNERS = 256  # more than this: each dimension's ends with the others at their first value


def corners(space: list[Param]) -> list[dict[str, Any]]:
    """The points planned: every combination of each dimension's values (its choices, or an
    interval's two ends), or when there are too many, one dimension at a time."""
    ends = [list(p.choices) if p.choices else _ends(p) for p in space]
    if math.prod(len(e) for e in ends) <= MAX_CORNERS:
        return [dict(zip([p.key for p in space], combo, strict=True))
                for combo in itertools.product(*ends)]
    base = {p.key: e[0] for p, e in zip(space, ends, strict=True)}
    return [base] + [{**base, p.key: v} for p, e in zip(space, ends, strict=True) for v in e[1:]]


def _ends(p: Param) -> list[Any]:
    return [int(p.low), int(p.high)] if p.integer else [p.low, p.high]


def at(job: JobConfig, values: dict[str, Any]) -> JobConfig:
    """`job` with the dotted keys of `values` set, checked as the schema checks a config."""
    tree = dataclasses.asdict(job)
    for key, value in values.items():
        node = tree
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return to_job(tree)


def trial_cost(plan: Plan, values: dict[str, Any]) -> dict[str, Any]:
    """One planned trial's row: its parameters, GPU-hours, cost, wall time and peak."""
    c = plan.compute
    return {"params": values, "world_size": plan.world_size, "wall_time_s": c.wall_time_s,
            "gpu_hours": c.gpu_hours, "cost_usd": c.cost_usd,
            "peak_bytes_per_rank": plan.memory.peak_total_bytes}


def study_trials(job: JobConfig, space: list[Param]) -> int:
    """The trials a study runs to: `search.trials`; a grid ends sooner, once each of its points
    ran."""
    if job.search.sampler != "grid":
        return job.search.trials
    return min(job.search.trials, math.prod(len(p.choices) for p in space))


def study_plan(job: JobConfig, space: list[Param],
               planner: Callable[[JobConfig], Plan]) -> dict[str, Any]:
    """Per-trial cost at each corner (the cheapest and the costliest kept) and the study's
    bound; corners the planner refuses are listed with the reason (a trial there fails its
    own checks)."""
    costs, refused = [], []
    for values in corners(space):
        try:
            costs.append(trial_cost(planner(at(job, values)), values))
        except ConfigError as e:
            refused.append({"params": values, "reason": str(e)})
    if not costs:
        raise ConfigError("search.params", refused[0]["params"], "a space with points the "
                          f"planner accepts (every corner is refused: {refused[0]['reason']})")
    key = _order(costs)
    low, high = min(costs, key=key), max(costs, key=key)
    n = study_trials(job, space)
    parallel = min(job.search.parallel, n)
    return {
        "trials": n, "parallel": parallel, "corners_planned": len(costs) + len(refused),
        "trial_min": low, "trial_max": high,
        "gpu_hours": _times(n, high["gpu_hours"]), "cost_usd": _times(n, high["cost_usd"]),
        # with `parallel` in flight: ceil(n / parallel) trials one after another, at most
        "wall_time_s": _times(math.ceil(n / parallel), high["wall_time_s"]),
        "budget_gpu_hours": job.search.budget_gpu_hours, "refused": refused,
    }


def _order(costs: list[dict[str, Any]]) -> Callable[[dict[str, Any]], tuple[float, ...]]:
    """Costliest by GPU-hours where every corner has them, else by peak memory."""
    if all(c["gpu_hours"] is not None for c in costs):
        return lambda c: (c["gpu_hours"], c["peak_bytes_per_rank"])
    return lambda c: (c["peak_bytes_per_rank"],)


def _times(n: int, value: Optional[float]) -> Optional[float]:
    return None if value is None else n * value


def check_budget(plan: dict[str, Any]) -> None:
    """`search.budget_gpu_hours`: refused when the study's bound is over it, or unknown."""
    budget = plan["budget_gpu_hours"]
    if budget is None:
        return
    if plan["gpu_hours"] is None:
        raise ConfigError("search.budget_gpu_hours", budget, "unset, or a study with a "
                          "GPU-hours estimate: set cluster.gpu (e.g. h100), which the plan "
                          "prices trials with")
    if plan["gpu_hours"] > budget:
        worst = ", ".join(f"{k}={v}" for k, v in plan["trial_max"]["params"].items())
        raise ConfigError("search.budget_gpu_hours", budget, f"at least {plan['gpu_hours']:.3g}"
                          f" (the study's plan: {plan['trials']} trials x up to "
                          f"{plan['trial_max']['gpu_hours']:.3g} GPU-h each, at {worst}); or "
                          "fewer search.trials or train.steps")


def plan_lines(plan: dict[str, Any]) -> list[str]:
    """The study's plan as printed before anything launches."""
    lo, hi = plan["trial_min"], plan["trial_max"]
    lines = [f"study plan: {plan['trials']} trials, {plan['parallel']} in flight; "
             f"{plan['corners_planned']} corners of the space planned"]
    if hi["gpu_hours"] is not None:
        cost = f", ${plan['cost_usd']:,.2f}" if plan["cost_usd"] is not None else ""
        lines.append(f"  a trial: {lo['gpu_hours']:.3g}-{hi['gpu_hours']:.3g} GPU-h; the study: "
                     f"at most {plan['gpu_hours']:.3g} GPU-h{cost}, "
                     f"{plan['wall_time_s'] / 3600:.3g} h wall")
    else:
        lines.append("  GPU-hours: not estimated (no cluster.gpu to price trials with)")
    lines.append(f"  peak memory per rank: {lo['peak_bytes_per_rank'] / 2**20:,.0f}-"
                 f"{hi['peak_bytes_per_rank'] / 2**20:,.0f} MiB")
    lines += [f"  layout {i}: {row['layout']}" for i, row in enumerate(plan.get("layouts", []))]
    lines += [f"  not run (beyond search.trials): {label}" for label in plan.get("not_run", [])]
    lines += [f"  refused by the planner: {r.get('layout') or r['params']}: {r['reason']}"
              for r in plan["refused"]]
    return lines
