"""What the search controller costs: a study of N trials against the same N runs launched
back to back by hand, and the study with 2 trials in flight.

    python scripts/bench_search.py [--trials 8] [--rounds 3] [--steps 6]

The trials are fixed (a grid over N learning rates), so the study and the plain runs train
exactly the same N configurations: 1-rank runs of gpt2_tiny (each trial one CPU rank, so two
in flight use the machine's two cores). Each round runs the three contenders in a rotated order:

- plain:   `python -m orchestrator ... optim.lr=X` for each X, one after another
- study-1: `action=search search.parallel=1` over the same X
- study-2: `action=search search.parallel=2`

Reported per round and as medians: the controller's overhead per trial,
(study-1 - plain) / N, and study-2 / plain. Targets (issue 29): overhead < 2 s per trial,
study-2 <= 0.6 x plain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from bench import bench_env, bootstrap_interval, machine  # noqa: E402

RATES = ("1e-3", "2e-3", "3e-3", "4e-3", "5e-3", "6e-3", "7e-3", "8e-3")


def common(steps: int) -> list[str]:
    return ["model=gpt2_tiny", f"train.steps={steps}", "cluster.gpus_per_node=1",
            "logging=none", "train.save_model=false", "logging.progress=false"]


def timed(argv: list[str]) -> float:
    began = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "orchestrator", *argv], cwd=REPO,
                         env=bench_env(), capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise SystemExit(f"failed ({out.returncode}): {' '.join(argv)}\n{out.stderr[-2000:]}")
    return time.perf_counter() - began


def plain(rates: tuple[str, ...], steps: int, work: Path) -> float:
    return sum(timed([*common(steps), f"optim.lr={lr}", f"hydra.run.dir={work / lr}"])
               for lr in rates)


def study(rates: tuple[str, ...], steps: int, parallel: int, work: Path) -> float:
    grid = f"+search.params.optim.lr='choice({','.join(rates)})'"
    return timed(["action=search", grid, "search.sampler=grid", f"search.trials={len(rates)}",
                  f"search.parallel={parallel}", "search.pruner=none", "search.metric=loss",
                  *common(steps), f"hydra.run.dir={work}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8, choices=range(2, len(RATES) + 1))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path,
                        default=Path(tempfile.gettempdir()) / "bench_search.json")
    args = parser.parse_args()
    rates = RATES[:args.trials]
    contenders = ("plain", "study-1", "study-2")
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            order = contenders[rnd % 3:] + contenders[:rnd % 3]  # rotated each round
            got = {}
            for name in order:
                work = Path(tmp) / f"{name}-{rnd}"
                got[name] = (plain(rates, args.steps, work) if name == "plain" else
                             study(rates, args.steps, int(name[-1]), work))
            row = {**got, "overhead_per_trial_s": (got["study-1"] - got["plain"]) / args.trials,
                   "parallel_ratio": got["study-2"] / got["plain"]}
            print(json.dumps({"round": rnd, **{k: round(v, 2) for k, v in row.items()}}),
                  flush=True)
            rounds.append(row)
    summary = {key: {"median": statistics.median(r[key] for r in rounds),
                     "spread": [min(r[key] for r in rounds), max(r[key] for r in rounds)],
                     "interval": bootstrap_interval([r[key] for r in rounds])}
               for key in ("overhead_per_trial_s", "parallel_ratio")}
    record = {"trials": args.trials, "steps": args.steps, "rounds": rounds,
              "summary": summary, "machine": machine()}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    for key, s in summary.items():
        print(f"{key}: median {s['median']:.3g}, spread {s['spread'][0]:.3g}-"
              f"{s['spread'][1]:.3g}, 95% bootstrap interval {s['interval']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
