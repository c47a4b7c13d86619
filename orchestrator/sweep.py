"""Sweep summary: after a Hydra multirun (`-m`), a table of every point's final loss and
tokens/s, the best point, and an SVG of the loss curves, written to the sweep directory.

Registered as a Hydra callback in configs/config.yaml. Points submitted to Slurm are waited
for first (their run directories hold slurm_job.json).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from orchestrator.metrics import read_metrics

SUMMARY_MD, SUMMARY_JSON, PLOT = "sweep_summary.md", "sweep_summary.json", "loss_curves.svg"
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")


def _wait_for_slurm(run_dir: Path) -> str | None:
    if not (run_dir / "slurm_job.json").exists():
        return None
    from orchestrator.launchers.slurm import SlurmHandle

    handle = SlurmHandle.load(run_dir)
    handle.wait()
    return handle.status()


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    points = []
    for run_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir()),
                          key=lambda p: (len(p.name), p.name)):
        if not (run_dir / "plan.json").exists():
            continue
        state = _wait_for_slurm(run_dir)
        overrides = (run_dir / "overrides.txt").read_text().split() if (
            run_dir / "overrides.txt").exists() else []
        metrics_file = run_dir / "metrics.jsonl"
        steps = read_metrics(metrics_file) if metrics_file.exists() else []
        losses = [m["loss"] for m in steps if "loss" in m]
        speeds = [m["tokens_per_s"] for m in steps[1:] if "tokens_per_s" in m]
        points.append({
            "point": run_dir.name, "overrides": overrides, "run_dir": str(run_dir),
            "state": state or ("COMPLETED" if losses else "NO METRICS"),
            "final_loss": losses[-1] if losses else None,
            "tokens_per_s": statistics.median(speeds) if speeds else None, "losses": losses,
        })
    return points


def _svg(points: list[dict[str, Any]]) -> str:
    w, h, pad = 640, 360, 40
    curves = [p for p in points if p["losses"]]
    all_losses = [v for p in curves for v in p["losses"]]
    if not all_losses:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}"/>\n'
    lo, hi = min(all_losses), max(all_losses)
    steps = max(len(p["losses"]) for p in curves)
    sx = (w - 2 * pad) / max(1, steps - 1)
    sy = (h - 2 * pad) / ((hi - lo) or 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}">',
             f'<text x="{pad}" y="20" font-size="14">loss vs step ({lo:.3f} to {hi:.3f})</text>',
             f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" '
             'fill="none" stroke="#999"/>']
    for i, p in enumerate(curves):
        color = COLORS[i % len(COLORS)]
        xy = " ".join(f"{pad + j * sx:.1f},{h - pad - (v - lo) * sy:.1f}"
                      for j, v in enumerate(p["losses"]))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{xy}"/>')
        label = " ".join(p["overrides"]).replace("&", "&amp;").replace("<", "&lt;")
        parts.append(f'<text x="{pad + 5}" y="{pad + 16 * (i + 1)}" font-size="11" '
                     f'fill="{color}">{p["point"]}: {label}</text>')
    return "\n".join([*parts, "</svg>"]) + "\n"


def summarize(sweep_dir: Path) -> list[dict[str, Any]]:
    points = collect(sweep_dir)
    done = [p for p in points if p["final_loss"] is not None]
    best = min(done, key=lambda p: p["final_loss"]) if done else None
    rows = ["| point | overrides | state | final loss | tokens/s |", "|---|---|---|---|---|"]
    for p in points:
        loss = f"{p['final_loss']:.4f}" if p["final_loss"] is not None else "-"
        tps = f"{p['tokens_per_s']:,.0f}" if p["tokens_per_s"] is not None else "-"
        rows.append(f"| {p['point']} | {' '.join(p['overrides'])} | {p['state']} | {loss} | "
                    f"{tps} |")
    if best:
        rows += ["", f"best: point {best['point']} ({' '.join(best['overrides'])}), final loss "
                 f"{best['final_loss']:.4f}"]
    (sweep_dir / SUMMARY_MD).write_text("\n".join(rows) + "\n")
    (sweep_dir / SUMMARY_JSON).write_text(json.dumps(
        {"best": best and best["point"], "points": points}, indent=2) + "\n")
    (sweep_dir / PLOT).write_text(_svg(points))
    print("\n".join(rows))
    print(f"sweep summary: {sweep_dir / SUMMARY_MD}, curves: {sweep_dir / PLOT}")
    return points


class SweepSummary(Callback):
    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.exists():
            summarize(sweep_dir)
