"""The GPU check's table: one row per run directory under DIR (scripts/gpu_check.sh).

    python scripts/gpu_table.py runs/gpu_check/<stamp>

Per training run: loss first -> last logged step, tokens/s and MFU (median over the logged
intervals after the first, which holds start-up work), and the planned device peak (without the
plan's fragmentation allowance) vs the largest `max_memory_allocated` of any interval, with the
error in %. Evaluate and generate rows say what they produced. Prints Markdown, for
docs/benchmarks.md. Exits 1 when a DeepSpeed ZeRO-3 run's measured peak exceeds its planned
peak with the plan's allowance (`peak_total_bytes`): the plan replays ZeRO-3's gathering
(planning/deepspeed_stage3.py), and this is its first check on a GPU.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from orchestrator.common.records import read_metrics


def _row(run: Path) -> list[str]:
    status_file = run / "status"
    name, status = run.name, status_file.read_text().strip() if status_file.exists() else "?"
    if (run / "eval.json").exists():
        ev = json.loads((run / "eval.json").read_text())
        return [name, status, f"eval loss {ev['loss']:.3f}, ppl {ev['perplexity']:.1f}",
                "", "", "", "", ""]
    if (run / "generations.jsonl").exists():
        rows = [json.loads(x) for x in (run / "generations.jsonl").open()]
        return [name, status, f"{len(rows)} completions", "", "", "", "", ""]
    metrics = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
    if not metrics:
        return [name, status, "no metrics", "", "", "", "", ""]
    steady = metrics[1:] or metrics
    tps = statistics.median(m["tokens_per_s"] for m in steady)
    mfu = [m["mfu"] for m in steady if "mfu" in m]
    measured = max(m["peak_mem_bytes"] for m in metrics)
    planned = metrics[-1].get("peak_mem_planned_bytes")
    error = f"{100 * (measured / planned - 1):+.1f}" if planned else ""
    return [name, status, f"{metrics[0]['loss']:.3f} -> {metrics[-1]['loss']:.3f}",
            f"{tps:,.0f}", f"{statistics.median(mfu):.3f}" if mfu else "",
            f"{planned / 2**30:.2f}" if planned else "", f"{measured / 2**30:.2f}", error]


def over_plan(run: Path) -> str | None:
    """A DeepSpeed ZeRO-3 run whose measured device peak exceeds the planned one: its line."""
    plan_file, metrics_file = run / "plan.json", run / "metrics.jsonl"
    if not (plan_file.exists() and metrics_file.exists()):
        return None
    plan = json.loads(plan_file.read_text())
    if plan.get("strategy") != "deepspeed" or plan.get("zero_stage") != 3:
        return None
    measured = max((m["peak_mem_bytes"] for m in read_metrics(metrics_file)), default=0)
    planned = plan["memory"]["peak_total_bytes"]
    if measured <= planned:
        return None
    return f"{run.name}: measured peak {measured / 2**30:.2f} GiB > planned {planned / 2**30:.2f}"


def main(root: str) -> int:
    runs = sorted(p for p in Path(root).iterdir() if p.is_dir())
    head = ["run", "exit", "loss first -> last", "tokens/s", "MFU", "planned peak GiB",
            "measured peak GiB", "error %"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for run in runs:
        print("| " + " | ".join(_row(run)) + " |")
    over = [line for line in map(over_plan, runs) if line]
    for line in over:
        print(f"gpu_table: {line}", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
