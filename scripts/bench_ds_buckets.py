"""DeepSpeed ZeRO-3 bucket sizes on CPU (issue 14): tokens/s of `+recipe=deepspeed_zero3` with the
generated buckets (one transformer block per collective and prefetch), with the previous rule
(d² elements, passed through `parallelism.deepspeed`), and of our FSDP2 ZeRO-3, on
`model=gpt2_small_cpu`, 2 gloo ranks, 12 steps each. Rounds interleave the three with the order
reversed every other round; each run's figure is the median tokens/s of its steps 4-12; the
paired per-round ratios and the medians are printed, with each run's last loss (the three
should agree: bucket sizes must not change the math).

    python scripts/bench_ds_buckets.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMON = ["model=gpt2_small_cpu", "train.steps=12", "logging=none", "logging.progress=false",
          "train.save_model=false", "train.log_every=1"]
D2 = 256 * 256  # gpt2_small_cpu: d_model 256
OLD = [f"+parallelism.deepspeed.zero_optimization.{k}={v}" for k, v in [
    ("reduce_bucket_size", D2), ("allgather_bucket_size", D2),
    ("stage3_prefetch_bucket_size", int(0.9 * D2)), ("stage3_max_live_parameters", 4 * D2),
    ("stage3_max_reuse_distance", 4 * D2)]]
RUNS = {"deepspeed_block": ["+recipe=deepspeed_zero3"],
        "deepspeed_d2": ["+recipe=deepspeed_zero3", *OLD],
        "fsdp2_zero3": ["+recipe=fsdp_zero3"]}


def one_run(name: str, run_dir: Path) -> tuple[float, float]:
    """(median tokens/s of steps 4.., last loss) of one run."""
    proc = subprocess.run([sys.executable, "-m", "orchestrator", *RUNS[name], *COMMON,
                           f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True,
                          text=True)
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "step" in r]
    return statistics.median(r["tokens_per_s"] for r in steps[3:]), steps[-1]["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    names = list(RUNS)
    got: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                got[name].append(one_run(name, Path(tmp) / f"{name}-{r}"))
                print(f"round {r + 1} {name}: {got[name][-1][0]:,.0f} tokens/s, last loss "
                      f"{got[name][-1][1]:.6f}", flush=True)
    print("\n| run | median tokens/s |\n|---|---|")
    for name in names:
        print(f"| {name} | {statistics.median(t for t, _ in got[name]):,.0f} |")
    for a, b in [("deepspeed_block", "deepspeed_d2"), ("deepspeed_block", "fsdp2_zero3"),
                 ("deepspeed_d2", "fsdp2_zero3")]:
        ratios = [x[0] / y[0] for x, y in zip(got[a], got[b], strict=True)]
        print(f"{a} / {b}: per round {', '.join(f'{q:.3f}' for q in ratios)}; median "
              f"{statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
