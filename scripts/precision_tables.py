"""The measured and computed tables of docs/precision.md (issue 15), printed as markdown.

    python scripts/precision_tables.py [--steps 20] [--skip-runs]

1. Number formats: bit layout, range, smallest normal, epsilon, from `torch.finfo` /
   `torch.iinfo` (never typed in).
2. Bytes per parameter the planner uses for model state (weights + gradients + AdamW's two
   moments) per precision at ZeRO stage 0, from `planning.memory.estimate` on a 1M-element
   parameter, and the ZeRO paper's figure for comparison.
3. Losses of fp32, bf16 and fp16 on the same model, data, seed and steps: `python -m
   orchestrator +recipe=ddp model=gpt2_small_cpu precision=<p> train.steps=N` (2 gloo ranks).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLOATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp8 e4m3fn": torch.float8_e4m3fn, "fp8 e5m2": torch.float8_e5m2}


def formats() -> str:
    rows = ["| format | bits (sign / exponent / fraction) | max | smallest normal | epsilon |",
            "|---|---|---|---|---|"]
    for name, dtype in FLOATS.items():
        info = torch.finfo(dtype)
        fraction = round(-math.log2(info.eps))  # epsilon = 2^-fraction
        exponent = info.bits - 1 - fraction
        rows.append(f"| {name} | {info.bits} (1 / {exponent} / {fraction}) | {info.max:.6g} | "
                    f"{info.smallest_normal:.6g} | {info.eps:.6g} |")
    i8 = torch.iinfo(torch.int8)
    rows.append(f"| int8 | {i8.bits} (two's complement) | {i8.max} (min {i8.min}) | 1 | — |")
    return "\n".join(rows)


def planner_bytes() -> str:
    from orchestrator.models.specs import ParamSpec
    from orchestrator.planning.memory import estimate, zero_paper_bytes

    n = 1 << 20
    spec = [ParamSpec("w", (1024, 1024), "root")]
    rows = ["| precision | weights | grads | AdamW moments | total per parameter | ZeRO paper |",
            "|---|---|---|---|---|---|"]
    for precision in ("fp32", "bf16", "fp16", "bf16_pure", "fp8"):
        moment = estimate(spec, 1, 0, precision).moments["after_backward"]
        parts = (moment.params_bytes / n, moment.grads_bytes / n, moment.optimizer_bytes / n)
        rows.append(f"| {precision} | {parts[0]:g} | {parts[1]:g} | {parts[2]:g} | "
                    f"{sum(parts):g} | {zero_paper_bytes(n, 1, 0, precision) / n:g} |")
    return "\n".join(rows)


def losses(steps: int) -> str:
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16", "fp16"):
            run_dir = Path(tmp) / precision
            cmd = [sys.executable, "-m", "orchestrator", "+recipe=ddp", "model=gpt2_small_cpu",
                   f"precision={precision}", f"train.steps={steps}", "logging=none",
                   "logging.progress=false", "train.save_model=false", f"hydra.run.dir={run_dir}"]
            subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=900)
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
            runs[precision] = {r["step"]: r["loss"] for r in records if "loss" in r}
    shown = sorted({1, steps // 4, steps // 2, steps} - {0})
    rows = ["| step | fp32 | bf16 | fp16 | bf16 − fp32 | fp16 − fp32 |",
            "|---|---|---|---|---|---|"]
    for step in shown:
        f32, b16, f16 = (runs[p][step] for p in ("fp32", "bf16", "fp16"))
        rows.append(f"| {step} | {f32:.5f} | {b16:.5f} | {f16:.5f} | {b16 - f32:+.2e} | "
                    f"{f16 - f32:+.2e} |")
    worst = {p: max(abs(runs[p][s] - runs["fp32"][s]) for s in runs["fp32"])
             for p in ("bf16", "fp16")}
    rows.append(f"\nLargest difference over all {steps} steps: bf16 {worst['bf16']:.2e}, "
                f"fp16 {worst['fp16']:.2e}.")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip-runs", action="store_true", help="only the computed tables")
    args = p.parse_args()
    print("### Number formats (torch.finfo / torch.iinfo)\n")
    print(formats())
    print("\n### Model-state bytes per parameter in the planner (ZeRO stage 0, AdamW)\n")
    print(planner_bytes())
    if not args.skip_runs:
        print(f"\n### fp32 vs bf16 vs fp16 losses (ddp, gpt2_small_cpu, {args.steps} steps)\n")
        print(losses(args.steps))


if __name__ == "__main__":
    main()
