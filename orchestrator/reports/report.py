"""`action=report`: the charts and a markdown summary of a finished run or sweep, written to
`<run_dir>/report/`. A run's metrics file is the one its config.yaml names
(`logging.metrics_file`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from orchestrator.common.contract import PLAN_JSON
from orchestrator.common.errors import ConfigError, OrchestratorError
from orchestrator.common.records import read_metrics
from orchestrator.config.load import metrics_file_of
from orchestrator.reports import sweep
from orchestrator.reports.charts import (
    HEIGHT,
    WIDTH,
    Series,
    bar_chart,
    line_chart,
    loss_curves,
    median_tokens_per_s,
)
from orchestrator.reports.profile import profile_section
from orchestrator.reports.search import SUMMARY_JSON, study_report
from orchestrator.reports.sweep import SWEEP_SUMMARY

REPORT_DIR, REPORT_MD = "report", "report.md"
LOSS_PNG, TOKENS_PNG, CURVES_PNG = "loss.png", "tokens_per_s.png", "loss_curves.png"


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:{spec}}"


def run_report(run_dir: Path, size: tuple[int, int] = (WIDTH, HEIGHT)) -> list[Path]:
    """`<run_dir>/report/`: loss (and val/loss) vs step, tokens/s vs step and report.md
    (final loss, best and last val/loss, median tokens/s, steps, world size; a profiled run's
    traces summarised). Returns the paths written."""
    out = run_dir / REPORT_DIR
    try:
        records = read_metrics(metrics_file_of(run_dir))
        events = read_metrics(metrics_file_of(run_dir), events=True)
    except ValueError as e:  # a corrupt record: the file, the line, the reason
        raise OrchestratorError(str(e)) from None

    def curve(key: str) -> tuple[list[float], list[float]]:
        rows = [r for r in records if key in r and "step" in r]
        return [r["step"] for r in rows], [r[key] for r in rows]

    loss, val, speed = curve("loss"), curve("val/loss"), curve("tokens_per_s")
    name = run_dir.absolute().name
    series: list[Series] = [("loss", *loss)] + ([("val/loss", *val)] if val[1] else [])
    charts = [line_chart(out / LOSS_PNG, series, f"{name}: loss vs step", "step", "loss", size),
              line_chart(out / TOKENS_PNG, [("tokens/s", *speed)],
                         f"{name}: tokens/s vs step", "step", "tokens/s", size)]
    sizes = [e["world_size"] for e in events if e.get("event") == "start" and "world_size" in e]
    world = " -> ".join(str(s) for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1])
    rows = [("steps", f"{records[-1].get('step', '-')} ({len(records)} records)" if records
             else "- (no step records)"),
            ("world size", (world + (" (resumed)" if len(sizes) > 1 else "")) or "-"),
            ("final loss", _fmt(loss[1][-1] if loss[1] else None))]
    if val[1]:
        best = min(range(len(val[1])), key=lambda i: val[1][i])
        rows += [("best val/loss", f"{_fmt(val[1][best])} (step {val[0][best]})"),
                 ("last val/loss", f"{_fmt(val[1][-1])} (step {val[0][-1]})")]
    rows.append(("median tokens/s", _fmt(median_tokens_per_s(records), ",.0f")))
    lines = [f"# Run report: {name}", "", "| | |", "|---|---|",
             *(f"| {k} | {v} |" for k, v in rows), "",
             *(f"![{p.stem}]({p.name})" for p in charts), *profile_section(run_dir)]
    md = out / REPORT_MD
    md.write_text("\n".join(lines) + "\n")
    return [*charts, md]


def sweep_report(sweep_dir: Path, size: tuple[int, int] = (WIDTH, HEIGHT)) -> list[Path]:
    """`<sweep_dir>/report/`: the loss curves of every point, the median tokens/s per point
    and report.md (the points' table and the best point). The points are those of
    sweep_summary.json, read again from their run directories where those are still there
    (a Slurm job is not waited for here). Returns the paths written."""
    try:
        stored = json.loads((sweep_dir / SWEEP_SUMMARY).read_text())["points"]
    except (ValueError, KeyError, TypeError) as e:
        raise OrchestratorError(f"{sweep_dir / SWEEP_SUMMARY}: not a sweep summary "
                                f"({type(e).__name__}: {e})") from None
    points = []
    for p in stored:
        run_dir = sweep_dir / str(p["point"])
        if not (run_dir / PLAN_JSON).exists():  # moved or deleted: as summarized
            points.append(p)
            continue
        state = p.get("state") if p.get("state") != sweep.NO_METRICS else None
        try:
            points.append(sweep.read_point(run_dir, state))
        except ValueError as e:  # a corrupt record: the file, the line, the reason
            raise OrchestratorError(str(e)) from None
    out = sweep_dir / REPORT_DIR
    name = sweep_dir.absolute().name
    charts = [loss_curves(out / CURVES_PNG, points, size),
              bar_chart(out / TOKENS_PNG,
                        [(f"{p['point']}: {' '.join(p['overrides'])}", p["tokens_per_s"])
                         for p in points],
                        f"{name}: median tokens/s per point", "tokens/s", size)]
    lines = [f"# Sweep report: {name}", "", *sweep.summary_rows(points), "",
             *(f"![{p.stem}]({p.name})" for p in charts)]
    md = out / REPORT_MD
    md.write_text("\n".join(lines) + "\n")
    return [*charts, md]


def report(run_dir: str | os.PathLike[str]) -> list[Path]:
    """`action=report`: the report of a run directory (holding its metrics file), a sweep
    directory (holding sweep_summary.json) or a search's study directory (its plots), in
    `<run_dir>/report/`. Returns the paths written;
    any other directory is a ConfigError naming `run_dir`."""
    path = Path(run_dir)
    metrics = metrics_file_of(path)
    if metrics.is_file():
        return run_report(path)
    if (path / SWEEP_SUMMARY).is_file():
        return sweep_report(path)
    if (path / SUMMARY_JSON).is_file():
        return study_report(path)
    raise ConfigError("run_dir", str(run_dir), f"a run directory holding {metrics.name}, a "
                      f"sweep directory holding {SWEEP_SUMMARY} or a study directory holding "
                      f"{SUMMARY_JSON} (`action=report run_dir=...`)")
