"""Checkpoint cost at world 2: save and load time and bytes, synchronous vs `async_save`.

    python scripts/bench_checkpoint.py [--rounds 3] [--recipe fsdp_zero3] [--model gpt2_small_cpu]

Each round runs both modes, in alternating order, as a user would: `python -m orchestrator` with
checkpoints every few steps (2 gloo ranks). From the run's metrics.jsonl: `blocked_s` (how long
the training loop waited for a save), `save_s` (until the checkpoint was committed) and, from a
second launch in the same run dir that resumes, `load_s`. Bytes are those the commit recorded
in meta.json. Medians over the rounds; the ratio is async's blocked time / sync's.
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


def launch(run_dir: Path, args: argparse.Namespace, mode: str, steps: int) -> None:
    cmd = [sys.executable, "-m", "orchestrator", f"+recipe={args.recipe}", f"model={args.model}",
           f"train.steps={steps}", f"checkpoint.every_steps={args.every}",
           "checkpoint.keep_last=1", f"checkpoint.async_save={mode == 'async'}", "logging=none",
           "logging.progress=false", "train.save_model=false", f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")


def events(run_dir: Path, name: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == name]


def measure(args: argparse.Namespace, mode: str, root: Path) -> dict[str, float]:
    run_dir = root / mode
    launch(run_dir, args, mode, args.steps)
    saves = events(run_dir, "checkpoint")
    newest = Path(saves[-1]["path"])
    size = sum(json.loads((newest / "meta.json").read_text())["files"].values())
    launch(run_dir, args, mode, args.steps + 1)  # resumes from the newest checkpoint
    (resumed,) = [e for e in events(run_dir, "start") if "load_s" in e]
    return {"blocked_s": statistics.median(s["blocked_s"] for s in saves),
            "save_s": statistics.median(s["save_s"] for s in saves),
            "load_s": resumed["load_s"], "bytes": size}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--recipe", default="fsdp_zero3")
    p.add_argument("--model", default="gpt2_small_cpu")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    results: dict[str, list[dict[str, float]]] = {"sync": [], "async": []}
    for r in range(args.rounds):
        order = ["sync", "async"] if r % 2 == 0 else ["async", "sync"]
        for mode in order:
            with tempfile.TemporaryDirectory() as tmp:
                results[mode].append(measure(args, mode, Path(tmp)))
            print(f"round {r + 1} {mode}: {results[mode][-1]}", flush=True)
    med = {m: {k: statistics.median(x[k] for x in rows) for k in rows[0]}
           for m, rows in results.items()}
    ratios = [a["blocked_s"] / s["blocked_s"] for a, s in zip(results["async"], results["sync"],
                                                               strict=True)]
    summary = {"recipe": args.recipe, "model": args.model, "world_size": 2,
               "rounds": results, "median": med,
               "async_blocked_over_sync": statistics.median(ratios)}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{args.recipe}, {args.model}, 2 gloo ranks, {args.rounds} rounds (medians)\n")
    print("| mode | loop blocked (s) | save until committed (s) | load (s) | bytes |")
    print("|---|---|---|---|---|")
    for m in ("sync", "async"):
        x = med[m]
        print(f"| {m} | {x['blocked_s']:.3f} | {x['save_s']:.3f} | {x['load_s']:.3f} | "
              f"{x['bytes'] / 2**20:.1f} MiB |")
    print(f"\nasync blocked / sync blocked, paired per round: "
          f"{', '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f})")


if __name__ == "__main__":
    main()
