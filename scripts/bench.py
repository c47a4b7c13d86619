"""The fair benchmark (issue 14): each of our strategies against a plain torchrun script written
without this project's code (scripts/baselines/, which import only torch and transformers).

    python scripts/bench.py [--rounds 7] [--steps 12] [--pairs ddp zero1 ...] [--quick]
                            [--out bench.json] [--md bench.md] [--chart bench.png]

Pairs (our recipe → the plain script of its own engine):
    ddp             → plain_ddp.py             (DistributedDataParallel)
    zero1           → plain_ddp.py             (ZeRO-1 shards only optimizer state: same work)
    fsdp_zero2      → plain_fsdp2.py --no-reshard   (fully_shard, reshard_after_forward=False)
    fsdp_zero3      → plain_fsdp2.py --reshard      (fully_shard, reshard_after_forward=True)
    deepspeed_zero3 → plain_deepspeed.py --stage 3  (deepspeed.initialize, DeepSpeed's defaults)
    tp2             → plain_tp.py              (parallelize_module, TP=2 with sequence
                                                parallelism; ours: parallelism.tensor_parallel=2
                                                on a Llama of the same shape)
    pp2             → plain_pp.py              (torch.distributed.pipelining, 2 stages, 1F1B,
                                                4 micro-batches; ours:
                                                parallelism.pipeline_parallel=2, the same)

Ours is launched as a user would, `python -m orchestrator +recipe=<recipe> model=gpt2_small_cpu
train.steps=N logging=none logging.progress=false train.save_model=false train.log_every=1
hydra.run.dir=<tmp>` (2 gloo ranks on CPU: the default cluster); the baseline as
`python -m torch.distributed.run --standalone --nproc-per-node 2 scripts/baselines/<script>
--out <tmp>.json --steps N`. Both get the same model shape, micro batch, sequence length,
optimizer, schedule, grad clip, fp32 and gloo (the baselines' docstrings list them), and the same
OMP_NUM_THREADS = CPU cores // 2 ranks (what our planner sets for CPU ranks; torchrun would set 1).
The data differ by design (ours: the seeded Markov-chain set; theirs: random ids): the same
shapes, so the same work.

Measured per launch:
- tokens/s: the median over steps 4..N (the first 3 are warm-up) of each step's tokens/s, on
  rank 0. Ours is read from <run_dir>/metrics.jsonl: with log_every=1 each record's interval is
  one step, from the end of the previous step's loss all-reduce to the end of this one's, so it
  holds data, LR update, forward, backward, clip, optimizer step and that collective. The
  baselines time the same window (after a barrier; see their docstrings).
- wall time: this script's clock around the launch, from starting the process to its exit (for
  ours: Hydra, validation, planning, torchrun, rank start-up, the steps, shutdown).
- outside the timed window: wall time minus the sum of all N steps' times (start-up + shutdown).

Each round runs every pair, ours and plain back to back; every other round the whole order is
reversed (pairs and sides), so drift in machine load hits both sides alike. Per pair: medians
over rounds, and the paired per-round ratios ours / plain (tokens/s, wall time, time outside the
window) with their median, their spread and a 95 % bootstrap interval of that median (10,000
resamples of the rounds, seeded), which the targets are judged on:
- every strategy: tokens/s >= 1.0 x the plain script of its own engine;
- start-up: time outside the timed window <= 1.3 x the bare torchrun script's.

Writes the JSON (`--out`, rewritten after every round, so a cut-short run keeps what it has), the
Markdown tables (stdout, and `--md`), and a bar chart of the tokens/s ratios (`--chart`, PNG).
`--quick`: one round of 6 steps (a smoke test; the median then covers steps 4-6 only).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench_tables import TARGET_STARTUP, TARGET_TPS, chart, fmt, markdown, met

REPO = Path(__file__).resolve().parents[1]
BASELINES = REPO / "scripts" / "baselines"
RANKS = 2
SKIP = 3  # warm-up steps left out of the median tokens/s
MODEL = "gpt2_small_cpu"
RUN_TIMEOUT_S = 240


@dataclass(frozen=True)
class Pair:
    recipe: str
    plain: str  # its label in tables
    script: str
    args: tuple[str, ...] = ()
    ours: tuple[str, ...] = ()  # our overrides; default: +recipe=<recipe> model=MODEL


# tp2, pp2: a Llama of gpt2_small_cpu's size (plain_tp.py builds the same) on the 2 ranks
LLAMA_SMALL = ("model=llama_tiny", "model.d_model=256", "model.n_layer=4", "model.n_head=8",
               "model.n_kv_head=4", "model.d_ff=688", "model.vocab_size=2048",
               "model.max_seq_len=256")

PAIRS: dict[str, Pair] = {p.recipe: p for p in (
    Pair("ddp", "plain DDP", "plain_ddp.py"),
    Pair("zero1", "plain DDP", "plain_ddp.py"),
    Pair("fsdp_zero2", "plain FSDP2 no-reshard", "plain_fsdp2.py", ("--no-reshard",)),
    Pair("fsdp_zero3", "plain FSDP2 reshard", "plain_fsdp2.py", ("--reshard",)),
    Pair("deepspeed_zero3", "plain DeepSpeed ZeRO-3", "plain_deepspeed.py", ("--stage", "3")),
    Pair("tp2", "plain TP (parallelize_module)", "plain_tp.py",
         ours=(*LLAMA_SMALL, "parallelism.tensor_parallel=2")),
    Pair("pp2", "plain PP (1F1B, 4 micro-batches)", "plain_pp.py",
         ours=(*LLAMA_SMALL, "parallelism.pipeline_parallel=2", "train.micro_batch_size=8",
               "parallelism.pipeline_microbatches=4")),
)}


@dataclass
class Run:
    pair: str
    side: str  # ours | plain
    round: int
    command: list[str]
    wall_s: float
    tokens_per_s: float | None = None  # median over steps SKIP+1..N
    steps_time_s: float | None = None  # sum of all steps' times
    outside_s: float | None = None  # wall_s - steps_time_s
    last_loss: float | None = None
    step_tokens_per_s: list[float] = field(default_factory=list)
    error: str | None = None


def bench_env() -> dict[str, str]:
    """The environment of both sides: OMP_NUM_THREADS as our planner sets it for CPU ranks."""
    threads = max(1, (os.cpu_count() or 1) // RANKS)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def launch(command: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """(wall seconds, exit code, output tail) of one launch, in its own process group, which
    is killed whole if it runs past RUN_TIMEOUT_S."""
    began = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += f"\n(killed after {RUN_TIMEOUT_S} s)"
    wall = time.perf_counter() - began
    return wall, proc.returncode, out[-3000:]


def run_ours(pair: Pair, steps: int, work: Path, rnd: int, env: dict[str, str]) -> Run:
    run_dir = work / f"ours-{pair.recipe}-{rnd}"
    chosen = pair.ours or (f"+recipe={pair.recipe}", f"model={MODEL}")
    command = [sys.executable, "-m", "orchestrator", *chosen, f"train.steps={steps}",
               "logging=none", "logging.progress=false", "train.save_model=false",
               "train.log_every=1", f"hydra.run.dir={run_dir}"]
    wall, code, tail = launch(command, env)
    run = Run(pair.recipe, "ours", rnd, command, wall)
    metrics = run_dir / "metrics.jsonl"
    if code != 0 or not metrics.exists():
        run.error = f"exit {code}: {tail}"
        return run
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    records = [r for r in records if "step" in r and "tokens_per_s" in r]
    previous, total = 0, 0.0
    for r in records:  # an interval's step_time_s is per step: weigh it by the interval
        total += r["step_time_s"] * (r["step"] - previous)
        previous = r["step"]
    run.step_tokens_per_s = [r["tokens_per_s"] for r in records]
    timed = [r["tokens_per_s"] for r in records if r["step"] > SKIP]
    run.tokens_per_s = statistics.median(timed) if timed else None
    run.steps_time_s, run.outside_s = total, wall - total
    run.last_loss = records[-1]["loss"] if records else None
    return run


def run_plain(pair: Pair, steps: int, work: Path, rnd: int, env: dict[str, str]) -> Run:
    out = work / f"plain-{pair.recipe}-{rnd}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(RANKS), str(BASELINES / pair.script), "--out", str(out), "--steps",
               str(steps), "--skip", str(SKIP), *pair.args]
    wall, code, tail = launch(command, env)
    run = Run(pair.recipe, "plain", rnd, command, wall)
    if code != 0 or not out.exists():
        run.error = f"exit {code}: {tail}"
        return run
    got = json.loads(out.read_text())
    run.step_tokens_per_s = [s["tokens_per_s"] for s in got["steps"]]
    run.tokens_per_s = got["median_tokens_per_s"]
    run.steps_time_s = got["steps_time_s"]
    run.outside_s = wall - got["steps_time_s"]
    run.last_loss = got["steps"][-1]["loss"] if got["steps"] else None
    return run


def ratios(runs: list[Run], pair: str, key: str) -> list[float | None]:
    """Per round: ours / plain of `key` (None where either side failed)."""
    by = {(r.side, r.round): getattr(r, key) for r in runs if r.pair == pair}
    rounds = sorted({r.round for r in runs if r.pair == pair})
    out: list[float | None] = []
    for n in rounds:
        a, b = by.get(("ours", n)), by.get(("plain", n))
        out.append(a / b if a is not None and b else None)
    return out


def median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def summarise(runs: list[Run], pairs: list[str]) -> dict[str, dict[str, Any]]:
    """Per pair: each side's medians over rounds, the per-round ratios and their medians."""
    out = {}
    for name in pairs:
        row: dict[str, Any] = {"plain": PAIRS[name].plain}
        for side in ("ours", "plain"):
            mine = [r for r in runs if r.pair == name and r.side == side]
            for key in ("tokens_per_s", "wall_s", "outside_s", "steps_time_s", "last_loss"):
                row[f"{side}_{key}"] = median([getattr(r, key) for r in mine])
        for key in ("tokens_per_s", "wall_s", "outside_s"):
            per_round = ratios(runs, name, key)
            row[f"{key}_ratios"] = per_round
            row[f"{key}_ratio"] = median(per_round)
            row[f"{key}_interval"] = bootstrap_interval(per_round)
        out[name] = row
    return out


def targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target the issue sets, with the measured median ratio and whether it is met."""
    out = []
    for name, row in summary.items():
        out.append({"target": f"{name} tokens/s >= {TARGET_TPS} x {row['plain']}",
                    "pair": name, "measured": row["tokens_per_s_ratio"], "bound": TARGET_TPS,
                    "interval": row["tokens_per_s_interval"],
                    "met": met(row["tokens_per_s_ratio"], TARGET_TPS, above=True)})
    for name, row in summary.items():
        value = row["outside_s_ratio"]
        out.append({"target": f"{name} start-up (time outside the timed steps) <= "
                              f"{TARGET_STARTUP} x bare torchrun {row['plain']}",
                    "pair": name, "measured": value, "bound": TARGET_STARTUP,
                    "interval": row["outside_s_interval"],
                    "met": met(value, TARGET_STARTUP, above=False)})
    return out


def bootstrap_interval(values: list[float | None], draws: int = 10_000,
                       level: float = 0.95) -> list[float] | None:
    """A percentile bootstrap interval of the median of `values` (the per-round ratios):
    `draws` resamples with replacement, seeded, so a record can be recomputed."""
    got = [v for v in values if v is not None]
    if len(got) < 2:
        return None
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(got, k=len(got))) for _ in range(draws))
    tail = (1 - level) / 2
    return [meds[int(tail * draws)], meds[min(draws - 1, int((1 - tail) * draws))]]


def machine() -> dict[str, Any]:
    model = platform.processor() or ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    versions = {}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("torch", "transformers", "deepspeed"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "versions": versions}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS),
                   help="our recipes to compare (default: all)")
    p.add_argument("--quick", action="store_true", help="one round of 6 steps (smoke test)")
    p.add_argument("--out", type=Path, default=Path("bench.json"))
    p.add_argument("--md", type=Path, default=None, help="also write the tables here")
    p.add_argument("--chart", type=Path, default=None, help="PNG of the tokens/s ratios")
    p.add_argument("--keep", type=Path, default=None,
                   help="keep run dirs and baseline JSON here (default: a temporary dir)")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.steps = 1, 6
    if args.steps <= SKIP:
        p.error(f"--steps must exceed the {SKIP} warm-up steps")
    return args


def main() -> None:
    args = parse_args()
    env = bench_env()
    began = time.perf_counter()
    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv, "rounds": args.rounds, "steps": args.steps, "skip": SKIP,
            "pairs": args.pairs, "ranks": RANKS, "model": MODEL,
            "omp_num_threads": env["OMP_NUM_THREADS"], "machine": machine(),
            "loadavg_start": os.getloadavg()}
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for rnd in range(args.rounds):
            forward = rnd % 2 == 0
            for name in args.pairs if forward else args.pairs[::-1]:
                pair = PAIRS[name]
                for side in ("ours", "plain") if forward else ("plain", "ours"):
                    fn = run_ours if side == "ours" else run_plain
                    run = fn(pair, args.steps, work, rnd, env)
                    runs.append(run)
                    status = (f"error: {run.error[-1500:]}" if run.error else
                              f"{fmt(run.tokens_per_s)} tokens/s, wall {run.wall_s:.1f} s, "
                              f"outside steps {run.outside_s:.1f} s, last loss "
                              f"{fmt(run.last_loss, '.4f')}")
                    print(f"round {rnd + 1}/{args.rounds} {name} {side}: {status}", flush=True)
            write_json(args.out, info, runs, args.pairs, began)
    summary, goals = write_json(args.out, info, runs, args.pairs, began)
    table = markdown(summary, goals)
    print()
    print(table, end="")
    print(f"\nbenchmark wall time {time.perf_counter() - began:.0f} s; JSON: {args.out}")
    if args.md:
        args.md.write_text(table)
    if args.chart:
        chart(summary, args.chart, f"ours ÷ plain torchrun tokens/s, {MODEL}, {RANKS} gloo "
                                   f"ranks, steps 4-{args.steps}, {args.rounds} rounds")
        print(f"chart: {args.chart}")
    if any(r.error for r in runs):
        sys.exit(1)


def write_json(path: Path, info: dict[str, Any], runs: list[Run], pairs: list[str],
               began: float) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The whole record so far (rewritten after every round); returns summary and targets."""
    summary = summarise(runs, pairs)
    goals = targets(summary)
    path.write_text(json.dumps({**info, "loadavg_end": os.getloadavg(),
                                "bench_wall_s": time.perf_counter() - began,
                                "summary": summary, "targets": goals,
                                "runs": [asdict(r) for r in runs]}, indent=2) + "\n")
    return summary, goals


if __name__ == "__main__":
    main()
