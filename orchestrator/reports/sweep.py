"""Sweep summary: after a Hydra multirun (`-m`), a table of every point's final loss and
tokens/s, the best point, and a PNG of the loss curves (reports/charts.py), written to the
sweep directory. `action=report run_dir=<sweep dir>` draws more charts from the same points.

Registered as a Hydra callback in configs/config.yaml. Points submitted to Slurm are waited
for first (their run directories hold slurm_job.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from orchestrator.common.contract import OVERRIDES_TXT, PLAN_JSON, SLURM_RECORD
from orchestrator.common.records import read_metrics
from orchestrator.common.secrets import redact_override
from orchestrator.config.load import metrics_file_of
from orchestrator.reports.charts import loss_curves, median_tokens_per_s

SUMMARY_MD, SUMMARY_JSON, PLOT = "sweep_summary.md", "sweep_summary.json", "loss_curves.png"
SWEEP_SUMMARY = SUMMARY_JSON
NO_METRICS = "NO METRICS"
FAILED, FAILED_RECORD = "FAILED", "failed.json"  # a point that failed: its state and record


def record_failed_point(run_dir: Path, overrides: list[str], code: int, error: str) -> None:
    """A failed point of a sweep, as its row: its overrides, exit code and error line (a
    refused point's run dir was removed again: it holds these files only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [redact_override(o) for o in overrides]
    (run_dir / OVERRIDES_TXT).write_text("".join(f"{line}\n" for line in lines))
    (run_dir / FAILED_RECORD).write_text(json.dumps(
        {"state": FAILED, "exit_code": code, "error": " ".join(error.split())}, indent=2) + "\n")


def _wait_for_slurm(run_dir: Path) -> str | None:
    if not (run_dir / SLURM_RECORD).exists():
        return None
    from orchestrator.launch.slurm_job import SlurmHandle

    handle = SlurmHandle.load(run_dir)
    handle.wait()
    return handle.status()


def read_point(run_dir: Path, state: str | None = None) -> dict[str, Any]:
    """One point of a sweep, from its run directory: overrides, state (`state`, else
    COMPLETED when it logged a loss), final loss, median tokens/s and its loss curve."""
    overrides = (run_dir / OVERRIDES_TXT).read_text().split() if (
        run_dir / OVERRIDES_TXT).exists() else []
    metrics_file = metrics_file_of(run_dir)
    records = read_metrics(metrics_file) if metrics_file.exists() else []
    failed = (json.loads((run_dir / FAILED_RECORD).read_text())
              if (run_dir / FAILED_RECORD).exists() else None)
    curve = [(m.get("step", i), m["loss"]) for i, m in enumerate(records, 1) if "loss" in m]
    losses = [loss for _, loss in curve]
    return {
        "point": run_dir.name, "overrides": overrides, "run_dir": str(run_dir),
        "state": FAILED if failed else state or ("COMPLETED" if losses else NO_METRICS),
        "error": failed["error"] if failed else None,
        "final_loss": losses[-1] if losses else None,
        "tokens_per_s": median_tokens_per_s(records), "losses": losses,
        "steps": [step for step, _ in curve],
    }


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every point (a subdirectory holding plan.json) in Hydra's job-number order, each
    Slurm job waited for."""
    points = []
    for run_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir()),
                          key=lambda p: (len(p.name), p.name)):
        if (run_dir / PLAN_JSON).exists() or (run_dir / FAILED_RECORD).exists():
            points.append(read_point(run_dir, _wait_for_slurm(run_dir)))
    return points


def best_point(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The point with the lowest final loss (points without metrics never are)."""
    done = [p for p in points if p["final_loss"] is not None]
    return min(done, key=lambda p: p["final_loss"]) if done else None


def summary_rows(points: list[dict[str, Any]]) -> list[str]:
    """The markdown table of the points, then the best one."""
    rows = ["| point | overrides | state | final loss | tokens/s |", "|---|---|---|---|---|"]
    for p in points:
        loss = f"{p['final_loss']:.4f}" if p["final_loss"] is not None else "-"
        tps = f"{p['tokens_per_s']:,.0f}" if p["tokens_per_s"] is not None else "-"
        rows.append(f"| {p['point']} | {' '.join(p['overrides'])} | {p['state']} | {loss} | "
                    f"{tps} |")
    failed = [p for p in points if p["state"] == FAILED]
    if failed:
        rows += ["", *(f"point {p['point']} failed: {p['error']}" for p in failed)]
    best = best_point(points)
    if best:
        rows += ["", f"best: point {best['point']} ({' '.join(best['overrides'])}), final loss "
                 f"{best['final_loss']:.4f}"]
    return rows


def summarize(sweep_dir: Path) -> list[dict[str, Any]]:
    points = collect(sweep_dir)
    best = best_point(points)
    rows = summary_rows(points)
    (sweep_dir / SUMMARY_MD).write_text("\n".join(rows) + "\n")
    (sweep_dir / SUMMARY_JSON).write_text(json.dumps(
        {"best": best and best["point"], "points": points}, indent=2) + "\n")
    loss_curves(sweep_dir / PLOT, points)
    print("\n".join(rows))
    print(f"sweep summary: {sweep_dir / SUMMARY_MD}, curves: {sweep_dir / PLOT}")
    return points


class SweepSummary(Callback):
    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.exists():
            summarize(sweep_dir)
