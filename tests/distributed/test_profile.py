"""`train.profile` (issue 27): 2 real ranks under torch.profiler for steps 2-3; each rank's trace
is a Chrome trace json holds with the training ops and the collectives, the steps under the
profiler carry no tokens/s, and `action=report` summarises the traces."""

from __future__ import annotations

import json
import math

import pytest

from orchestrator.common.records import read_metrics
from orchestrator.reports.profile import summarize
from tests.conftest import run_ok


def assert_planned_traffic(run) -> None:
    """The plan's data-parallel bytes per step against FSDP2's collectives in rank 0's trace
    of steps 2-3: each all-gather sends half its gathered buffer, each reduce-scatter half the
    buffer it reduces (2 ranks, 4-byte elements; FSDP2 pads each unit to an even count, which
    gpt2_tiny's already are: measured equal)."""
    trace = json.loads((run / "profile" / "rank0.json").read_text())["traceEvents"]
    whole = {"c10d::_allgather_base_": 0, "c10d::_reduce_scatter_base_": 1}  # which operand
    sent = sum(math.prod(e["args"]["Input Dims"][whole[e["name"]]]) * 4 / 2
               for e in trace if e.get("name") in whole)
    planned = json.loads((run / "plan.json").read_text())["comm_bytes"]
    assert planned["tp"] == 0
    assert planned["dp"] == pytest.approx(sent / 2, rel=1e-3)  # two profiled steps


def test_two_ranks_write_traces_of_the_profiled_steps(tmp_path) -> None:
    run = tmp_path / "run"
    run_ok(["+recipe=fsdp_zero3", "train.profile.steps=[2,3]", "train.steps=6",
            "train.save_model=false", "logging=none"], run)
    for rank in (0, 1):
        spans = [e for e in json.loads((run / "profile" / f"rank{rank}.json").read_text())
                 ["traceEvents"] if e.get("ph") == "X"]
        names = {e["name"] for e in spans}
        # the two recorded steps (step 1 was the profiler's unrecorded warm-up)
        assert len([n for n in names if n.startswith("ProfilerStep#")]) == 2, rank
        assert {"aten::mm", "aten::addmm"} & names  # the matmuls of forward and backward
        assert any(n.startswith("autograd::engine::evaluate_function") for n in names)
        assert any(n.startswith("Optimizer.step#AdamW") for n in names)
        # FSDP2's parameter all-gathers and gradient reduce-scatters, run by gloo
        assert any("allgather" in n.lower() or "all_gather" in n.lower() for n in names)
        assert any("reduce_scatter" in n.lower() for n in names)
        assert any(e.get("args", {}).get("Input Dims") for e in spans)  # record_shapes
    assert_planned_traffic(run)
    records = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    assert sorted(records) == [1, 2, 3, 4, 5, 6]  # each step under the profiler logged alone
    assert [s for s, r in records.items() if r.get("profiled")] == [1, 2, 3]
    assert all("tokens_per_s" not in records[s] for s in (1, 2, 3))
    assert all(records[s]["tokens_per_s"] > 0 for s in (4, 5, 6))
    (event,) = [e for e in read_metrics(run / "metrics.jsonl", events=True)
                if e.get("event") == "profile"]
    assert event["steps"] == [2, 3] and event["dir"] == str(run / "profile")

    run_ok(["action=report", f"run_dir={run}"], tmp_path / "report")
    md = (run / "report" / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith(("| 0 | 2 |", "| 1 | 2 |"))]
    assert len(rows) == 2, md
    for rank, row in enumerate(rows):  # communication share of host time, and the top ops
        share = float(row.split("|")[4].split("%")[0])
        assert 0 < share < 100, row
        top = summarize(run / "profile" / f"rank{rank}.json", rank, top=30)
        listed = [op.rsplit(" ", 1)[0] for op in row.split("|")[6].strip().split("; ")]
        assert listed == [name for name, _ in top.top[:5]], row
        assert {"aten::mm", "aten::addmm"} & {name for name, _ in top.top}  # compute is there
        assert all(ms > 0 for _, ms in top.top[:5])
