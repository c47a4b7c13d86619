"""Print the Markdown tables of docs/planning.md from the planner itself (no hand numbers).

    python scripts/planning_tables.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.config.gpus import GPUS  # noqa: E402
from orchestrator.planning import compute  # noqa: E402
from orchestrator.planning.plan import cached_specs  # noqa: E402
from tests.conftest import make_job  # noqa: E402

MODELS = ["gpt2", "gpt2_medium", "gpt2_large", "gpt2_xl", "bert_base", "t5_base", "llama2_7b",
          "llama3_8b"]
MFU = 0.4


def chinchilla_table() -> None:
    h100 = GPUS["h100"].bf16
    print("| model | parameters N | Chinchilla tokens 20·N | 6·N·D FLOPs "
          "| H100-hours at 40 % MFU |")
    print("|---|---|---|---|---|")
    for name in MODELS:
        n = sum(s.numel for s in cached_specs(make_job([f"model={name}"]).model))
        d = compute.CHINCHILLA_TOKENS_PER_PARAM * n
        flops = 6 * n * d
        print(f"| {name} | {n / 1e9:.3f} B | {d / 1e9:,.0f} B | {flops:.2e} | "
              f"{flops / (h100 * MFU) / 3600:,.0f} |")


def bloomberg_comparison() -> None:
    # Public figures from the BloombergGPT paper (Wu et al. 2023): 50.6B parameters trained on
    # 569B tokens. Everything else below is computed.
    n, d = 50.6e9, 569e9
    c = 6 * n * d
    n_opt, d_opt = compute.chinchilla_optimum(c)
    print("| | parameters | tokens | tokens/param | 6·N·D FLOPs |")
    print("|---|---|---|---|---|")
    print(f"| BloombergGPT as trained | {n / 1e9:.1f} B | {d / 1e9:.0f} B | {d / n:.1f} | "
          f"{c:.2e} |")
    print(f"| Chinchilla-optimal for that budget | {n_opt / 1e9:.1f} B | {d_opt / 1e9:.0f} B | "
          f"20.0 | {6 * n_opt * d_opt:.2e} |")
    print(f"\nVerdict for the trained run: {compute.verdict(d / (20 * n))}.")


if __name__ == "__main__":
    chinchilla_table()
    print()
    bloomberg_comparison()
