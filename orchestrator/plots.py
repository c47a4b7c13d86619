"""Charts (PNG, matplotlib's Agg renderer, no display) and `action=report`: the charts and a
markdown summary of a finished run or sweep, written to `<run_dir>/report/`.

The sweep summary (orchestrator/sweep.py) draws its loss curves here too: one plotting path.
matplotlib is imported inside the drawing functions only, so other actions never load it.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.metrics import read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS, SWEEP_SUMMARY = "metrics.jsonl", "sweep_summary.json"
REPORT_DIR, REPORT_MD = "report", "report.md"
LOSS_PNG, TOKENS_PNG, CURVES_PNG = "loss.png", "tokens_per_s.png", "loss_curves.png"
WIDTH, HEIGHT, DPI = 960, 540, 100  # every chart's size in pixels
Series = tuple[str, Sequence[float], Sequence[float]]  # (label, x values, y values)


def median_tokens_per_s(records: Sequence[dict[str, Any]]) -> float | None:
    """The median tokens/s of the step records after the first (that one includes warm-up:
    compilation, allocator growth); None when there is none."""
    speeds = [r["tokens_per_s"] for r in records[1:] if "tokens_per_s" in r]
    return statistics.median(speeds) if speeds else None


def _figure(size: tuple[int, int]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # Agg, whatever backend the user's matplotlibrc names
    return fig


def _save(fig: Figure, path: Path) -> Path:
    """Write the PNG whole or not at all (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=DPI, bbox_inches=None)  # exactly the figure's size
    os.replace(tmp, path)
    return path


def _no_data(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=ax.transAxes,
            color="#666666")


def _short(label: str, limit: int = 70) -> str:
    return label if len(label) <= limit else label[:limit - 3] + "..."


def line_chart(path: Path, series: Sequence[Series], title: str, xlabel: str, ylabel: str,
               size: tuple[int, int] = (WIDTH, HEIGHT)) -> Path:
    """A PNG of one line per (label, x, y) series, with a legend when there are several;
    a series of a single point is drawn as a marker. Returns `path`."""
    import matplotlib.style

    with matplotlib.style.context("default"):  # not the user's matplotlibrc
        fig = _figure(size)
        ax = fig.add_subplot()
        drawn = [s for s in series if len(s[2])]
        for label, xs, ys in drawn:
            ax.plot(xs, ys, label=_short(label), marker="o" if len(ys) < 2 else None,
                    markersize=4)
        if not drawn:
            _no_data(ax, "step records")
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        if len(drawn) > 1:
            ax.legend(fontsize="small")
        return _save(fig, path)


def bar_chart(path: Path, bars: Sequence[tuple[str, float | None]], title: str, xlabel: str,
              size: tuple[int, int] = (WIDTH, HEIGHT)) -> Path:
    """A PNG of horizontal bars, one per (label, value), top to bottom in the given order; a
    None value is labelled "no data" instead. Returns `path`."""
    import matplotlib.style

    with matplotlib.style.context("default"):
        fig = _figure(size)
        ax = fig.add_subplot()
        if bars:
            ys = list(range(len(bars)))[::-1]
            values = [v if v is not None else 0.0 for _, v in bars]
            ax.barh(ys, values, color="#1f77b4")
            ax.set_yticks(ys, [_short(label, 50) for label, _ in bars], fontsize="small")
            for y, (_, value) in zip(ys, bars, strict=True):
                text = "no data" if value is None else f" {value:,.0f}"
                ax.text(value or 0.0, y, text, va="center", fontsize="small")
        else:
            _no_data(ax, "points")
        ax.set(title=title, xlabel=xlabel)
        ax.grid(axis="x", alpha=0.3)
        return _save(fig, path)


def loss_curves(path: Path, points: Sequence[dict[str, Any]],
                size: tuple[int, int] = (WIDTH, HEIGHT)) -> Path:
    """A sweep's loss curves, one line per point labelled `<point>: <overrides>` (points as
    `sweep.read_point` returns them)."""
    series = [(f"{p['point']}: {' '.join(p['overrides'])}",
               p.get("steps") or range(1, len(p["losses"]) + 1), p["losses"]) for p in points]
    return line_chart(path, series, "loss vs step", "step", "loss", size)


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:{spec}}"


def run_report(run_dir: Path, size: tuple[int, int] = (WIDTH, HEIGHT)) -> list[Path]:
    """`<run_dir>/report/`: loss (and val/loss) vs step, tokens/s vs step and report.md
    (final loss, best and last val/loss, median tokens/s, steps, world size). Returns the
    paths written."""
    out = run_dir / REPORT_DIR
    try:
        records = read_metrics(run_dir / METRICS)
        events = read_metrics(run_dir / METRICS, events=True)
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
             *(f"![{p.stem}]({p.name})" for p in charts)]
    md = out / REPORT_MD
    md.write_text("\n".join(lines) + "\n")
    return [*charts, md]


def sweep_report(sweep_dir: Path, size: tuple[int, int] = (WIDTH, HEIGHT)) -> list[Path]:
    """`<sweep_dir>/report/`: the loss curves of every point, the median tokens/s per point
    and report.md (the points' table and the best point). The points are those of
    sweep_summary.json, read again from their run directories where those are still there
    (a Slurm job is not waited for here). Returns the paths written."""
    import json

    from orchestrator import sweep

    try:
        stored = json.loads((sweep_dir / SWEEP_SUMMARY).read_text())["points"]
    except (ValueError, KeyError, TypeError) as e:
        raise OrchestratorError(f"{sweep_dir / SWEEP_SUMMARY}: not a sweep summary "
                                f"({type(e).__name__}: {e})") from None
    points = []
    for p in stored:
        run_dir = sweep_dir / str(p["point"])
        if not (run_dir / "plan.json").exists():  # moved or deleted: as summarized
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
    """`action=report`: the report of a run directory (holding metrics.jsonl) or of a sweep
    directory (holding sweep_summary.json), in `<run_dir>/report/`. Returns the paths written;
    any other directory is a ConfigError naming `run_dir`."""
    path = Path(run_dir)
    if (path / METRICS).is_file():
        return run_report(path)
    if (path / SWEEP_SUMMARY).is_file():
        return sweep_report(path)
    raise ConfigError("run_dir", str(run_dir), f"a run directory holding {METRICS} or a sweep "
                      f"directory holding {SWEEP_SUMMARY} (`action=report run_dir=...`)")
