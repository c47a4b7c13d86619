"""`action=report` on a profiled run (`train.profile`): each rank's Chrome trace
(`profile/rank<N>.json`) summarised as the top ops by self time and the share of the recorded
steps spent in communication.

Self time is an op's duration less that of the ops nested in it on the same thread. On CUDA the
shares are of GPU kernel time (NCCL kernels against the rest); on CPU, of the recorded steps'
wall time on the host (the time inside collectives: gloo runs them on the calling thread).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.common.contract import PROFILE_DIR

COMM = re.compile(r"all_?reduce|all_?gather|reduce_?scatter|broadcast|barrier|all_?to_?all|"
                  r"send|recv|nccl|gloo|record_param_comms", re.IGNORECASE)
STEP = "ProfilerStep#"


@dataclass
class RankProfile:
    rank: int
    steps: int  # recorded steps (ProfilerStep spans)
    step_ms: float  # their total wall time
    comm_share: float  # of the steps' time (CPU) or of kernel time (CUDA) in communication
    device: str  # "cuda" when the trace holds GPU kernels, else "cpu"
    top: list[tuple[str, float]]  # (op, self time ms), most first


def _spans(trace: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in trace.get("traceEvents", [])
            if e.get("ph") == "X" and isinstance(e.get("dur"), (int, float))]


def self_times(spans: list[dict[str, Any]]) -> dict[str, float]:
    """Op name → summed self time (µs) over the host threads' ops (not the step spans)."""
    out: dict[str, float] = defaultdict(float)
    threads: dict[tuple[Any, Any], list[dict[str, Any]]] = defaultdict(list)
    for e in spans:
        if e.get("cat") in ("cpu_op", "user_annotation") and not e["name"].startswith(STEP):
            threads[e.get("pid"), e.get("tid")].append(e)
    for ops in threads.values():
        ops.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[tuple[dict[str, Any], float]] = []  # (op, its end)
        for e in ops:
            while stack and stack[-1][1] <= e["ts"]:
                stack.pop()
            out[e["name"]] += e["dur"]
            if stack:
                out[stack[-1][0]["name"]] -= e["dur"]  # nested: not its parent's self time
            stack.append((e, e["ts"] + e["dur"]))
    return out


def _covered(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def summarize(path: Path, rank: int, top: int = 10) -> RankProfile:
    """One rank's trace: recorded steps, their time, the communication share, the top ops."""
    spans = _spans(json.loads(path.read_text()))
    steps = [e for e in spans if e["name"].startswith(STEP)]
    step_us = sum(e["dur"] for e in steps)
    kernels = [e for e in spans if e.get("cat") == "kernel"]
    if kernels:
        comm = sum(e["dur"] for e in kernels if COMM.search(e["name"]))
        share, device = comm / max(sum(e["dur"] for e in kernels), 1e-9), "cuda"
    else:
        comm = _covered([(e["ts"], e["ts"] + e["dur"]) for e in spans
                         if e.get("cat") == "cpu_op" and COMM.search(e["name"])])
        share, device = comm / max(step_us, 1e-9), "cpu"
    ranked = sorted(self_times(spans).items(), key=lambda kv: -kv[1])[:top]
    return RankProfile(rank, len(steps), step_us / 1000, share, device,
                       [(name, us / 1000) for name, us in ranked])


def profile_section(run_dir: Path) -> list[str]:
    """report.md's lines for the run's traces ([] when it was not profiled)."""
    traces = sorted((run_dir / PROFILE_DIR).glob("rank*.json"),
                    key=lambda p: int(p.stem.removeprefix("rank") or 0))
    if not traces:
        return []
    ranks = [summarize(p, int(p.stem.removeprefix("rank"))) for p in traces]
    lines = ["", f"## Profile ({PROFILE_DIR}/rank<N>.json)", "",
             "| rank | steps | time (ms) | communication | compute | top ops by self time (ms) |",
             "|---|---|---|---|---|---|"]
    for r in ranks:
        ops = "; ".join(f"{name} {ms:.1f}" for name, ms in r.top[:5])
        kind = "GPU kernel time" if r.device == "cuda" else "host time"
        lines.append(f"| {r.rank} | {r.steps} | {r.step_ms:.1f} | {100 * r.comm_share:.1f} % "
                     f"of {kind} | {100 * (1 - r.comm_share):.1f} % | {ops} |")
    return lines
