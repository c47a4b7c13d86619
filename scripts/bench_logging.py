"""What per-step logging costs (issue 14: < 1 % of a `gpt2_small_cpu` step at `log_every=1`).

    python scripts/bench_logging.py [--rounds 3] [--steps 20] [--calls 2000] [--out FILE]

Two measurements, each in interleaved rounds with alternating order:

1. End to end: `python -m orchestrator +recipe=ddp model=gpt2_small_cpu` (2 gloo ranks) with
   everything on (`train.log_every=1`, W&B offline, the progress bar) against everything off
   (`logging=none logging.progress=false train.log_every=<steps>`: one record for the whole
   run). Compared: the wall time of all steps (the sum of the step times in metrics.jsonl,
   which run from one logged step's end to the next, logging included), paired per round.
   The machine's noise is larger than 1 %, so this bounds the cost only loosely.
2. In process: the rank-0 logger's per-step calls (`MetricsLogger.log` with a full step record,
   then `progress`), W&B offline and the bar on, timed over `--calls` steps, against the
   median step time of the end-to-end runs with everything off. This is the figure the target
   is judged on; it leaves out W&B's service process, whose CPU time part 1 includes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import MODEL, REPO, bench_env, launch  # noqa: E402

sys.path.insert(0, str(REPO))
TARGET = 0.01


def run(steps: int, full: bool, run_dir: Path, env: dict[str, str]) -> dict[str, float]:
    """One launch; its steps' total time and the median step time."""
    on = ["train.log_every=1", "logging.wandb.mode=offline", "logging.progress=true"]
    off = ["logging=none", "logging.progress=false", f"train.log_every={steps}"]
    command = [sys.executable, "-m", "orchestrator", "+recipe=ddp", f"model={MODEL}",
               f"train.steps={steps}", "train.save_model=false", f"hydra.run.dir={run_dir}",
               *(on if full else off)]
    wall, code, tail = launch(command, env)
    if code != 0:
        raise SystemExit(f"exit {code}: {' '.join(command)}\n{tail}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "step_time_s" in r]
    total, previous = 0.0, 0
    for r in records:
        total += r["step_time_s"] * (r["step"] - previous)
        previous = r["step"]
    return {"wall_s": wall, "steps_s": total, "step_s": total / steps}


def logger_calls(calls: int, work: Path) -> float:
    """Seconds per logged step of the rank-0 logger with W&B offline and the progress bar."""
    from hydra import compose, initialize_config_module

    from orchestrator.cli import compose_job
    from orchestrator.run.metrics import MetricsLogger

    with initialize_config_module("configs", version_base="1.3"):
        cfg = compose("config", [f"model={MODEL}", "logging.wandb.mode=offline",
                                 "logging.progress=true", f"train.steps={calls}"])
    work.mkdir(parents=True)
    logger = MetricsLogger(compose_job(cfg, str(work)))
    logger.wandb_id()  # W&B is up: time the steady state, not its start
    record = {"loss": 3.21, "lr": 3e-4, "tokens_per_s": 2345.6, "step_time_s": 0.71,
              "peak_mem_bytes": 1_234_567_890, "grad_norm": 0.97}
    began = time.perf_counter()
    for step in range(1, calls + 1):
        logger.log(step, {**record, "loss": 3.21 - step * 1e-4})
        logger.progress(step, record["loss"], record["tokens_per_s"])
    per_call = (time.perf_counter() - began) / calls
    logger.close()
    return per_call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--out", type=Path, default=Path("bench_logging.json"))
    args = p.parse_args()
    env = {**bench_env(), "WANDB_SILENT": "true"}
    rows: list[dict[str, float | int | str]] = []
    per_call: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            order = (True, False) if rnd % 2 == 0 else (False, True)
            for full in order:
                got = run(args.steps, full, Path(tmp) / f"{rnd}-{int(full)}", env)
                rows.append({"round": rnd, "side": "on" if full else "off", **got})
                print(f"round {rnd + 1} logging {'on ' if full else 'off'}: steps "
                      f"{got['steps_s']:.2f} s, wall {got['wall_s']:.1f} s", flush=True)
            per_call.append(logger_calls(args.calls, Path(tmp) / f"calls-{rnd}"))
            print(f"round {rnd + 1} logger: {per_call[-1] * 1e3:.3f} ms per step", flush=True)

    def side(name: str, rnd: int) -> dict[str, float | int | str]:
        return next(r for r in rows if r["side"] == name and r["round"] == rnd)

    paired = [float(side("on", r)["steps_s"]) / float(side("off", r)["steps_s"])
              for r in range(args.rounds)]
    step_s = statistics.median(float(r["step_s"]) for r in rows if r["side"] == "off")
    share = statistics.median(per_call) / step_s
    result = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "argv": sys.argv, "nproc": os.cpu_count(), "model": MODEL, "runs": rows,
              "end_to_end_ratio_per_round": paired,
              "end_to_end_ratio_median": statistics.median(paired),
              "logger_s_per_step": per_call, "step_s_median": step_s,
              "logger_share_of_step": share, "target": TARGET, "met": share < TARGET}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nend to end, all steps' time, logging on ÷ off: median "
          f"{statistics.median(paired):.3f} (rounds {', '.join(f'{x:.3f}' for x in paired)})")
    print(f"logger per step {statistics.median(per_call) * 1e3:.3f} ms = {100 * share:.3f} % "
          f"of a {step_s * 1e3:.0f} ms step (target < {100 * TARGET:.0f} %: "
          f"{'met' if share < TARGET else 'missed'}); JSON: {args.out}")


if __name__ == "__main__":
    main()
