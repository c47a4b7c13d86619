"""The tables and the chart of `scripts/bench.py`'s summary (split out to keep it short)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TARGET_TPS = 1.0  # every strategy at least its own engine's plain script
TARGET_STARTUP = 1.3  # time outside the timed steps, against bare torchrun


def met(value: float | None, bound: float, above: bool) -> bool | None:
    if value is None:
        return None
    return value >= bound if above else value <= bound


def fmt(value: float | None, fmt: str = ",.0f") -> str:
    return "—" if value is None else format(value, fmt)


def _per_round(values: list[float | None]) -> str:
    return ", ".join(fmt(v, ".3f") for v in values)


def markdown(summary: dict[str, dict[str, Any]], goals: list[dict[str, Any]]) -> str:
    lines = ["| our recipe | plain script | ours tokens/s | plain tokens/s | "
             "ours ÷ plain tokens/s, per round | median | spread | 95 % interval of the median |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in summary.items():
        got = [v for v in r["tokens_per_s_ratios"] if v is not None]
        spread = f"{min(got):.3f}–{max(got):.3f}" if got else "—"
        ci = r["tokens_per_s_interval"]
        lines.append(f"| `{name}` | {r['plain']} | {fmt(r['ours_tokens_per_s'])} | "
                     f"{fmt(r['plain_tokens_per_s'])} | {_per_round(r['tokens_per_s_ratios'])} | "
                     f"{fmt(r['tokens_per_s_ratio'], '.3f')} | {spread} | "
                     f"{'—' if ci is None else f'{ci[0]:.3f}–{ci[1]:.3f}'} |")
    lines += ["", "| our recipe | ours wall s | plain wall s | ours ÷ plain wall, per round | "
              "median | ours outside steps s | plain outside steps s | "
              "ours ÷ plain outside, per round | median |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary.items():
        lines.append(f"| `{name}` | {fmt(r['ours_wall_s'], '.1f')} | "
                     f"{fmt(r['plain_wall_s'], '.1f')} | {_per_round(r['wall_s_ratios'])} | "
                     f"{fmt(r['wall_s_ratio'], '.3f')} | {fmt(r['ours_outside_s'], '.1f')} | "
                     f"{fmt(r['plain_outside_s'], '.1f')} | {_per_round(r['outside_s_ratios'])} | "
                     f"{fmt(r['outside_s_ratio'], '.3f')} |")
    lines += ["", "| target | measured (median ratio) | met |", "|---|---|---|"]
    for g in goals:
        met = "—" if g["met"] is None else ("yes" if g["met"] else "no")
        lines.append(f"| {g['target']} | {fmt(g['measured'], '.3f')} | {met} |")
    return "\n".join(lines) + "\n"


def chart(summary: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Bars: median ours ÷ plain tokens/s per pair; dots: the rounds; lines: 1.0 and targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2.5, 4.2))
    medians = [summary[n]["tokens_per_s_ratio"] or 0.0 for n in names]
    bars = ax.bar(range(len(names)), medians, color="#4c72b0", width=0.6, label="median")
    for i, n in enumerate(names):
        pts = [v for v in summary[n]["tokens_per_s_ratios"] if v is not None]
        ax.scatter([i] * len(pts), pts, color="black", s=14, zorder=3,
                   label="rounds" if i == 0 else None)
    for bar, value in zip(bars, medians, strict=True):
        ax.annotate(f"{value:.3f}", (bar.get_x() + bar.get_width() / 2, value),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                    textcoords="offset points")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(TARGET_TPS, color="tab:red", ls="--", lw=1, label=f"target {TARGET_TPS}")
    ax.set_xticks(range(len(names)), [f"{n}\nvs {summary[n]['plain']}" for n in names],
                  fontsize=7)
    ax.set_ylabel("ours ÷ plain tokens/s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


