"""Charts (PNG, matplotlib's Agg renderer, no display): line and bar charts, a sweep's loss
curves, and the median tokens/s the reports quote. matplotlib is imported inside the drawing
functions only, so other actions never load it.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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
