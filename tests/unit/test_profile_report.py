"""`action=report`'s summary of a profiled run's traces (reports/profile.py), on a hand-made
Chrome trace whose answers are worked out here by hand."""

from __future__ import annotations

import json

import pytest

from orchestrator.reports.profile import profile_section, summarize


def span(name: str, ts: float, dur: float, cat: str = "cpu_op", tid: int = 1) -> dict:
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "pid": 7, "tid": tid}


# One thread, two recorded steps of 100 µs each:
#   step 1 [0, 100): aten::linear [0, 60) holding aten::mm [10, 50); c10d::allreduce_ [60, 90)
#   step 2 [100, 200): aten::mm [100, 130); record_param_comms [130, 150) on another thread
#     while gloo:all_reduce [140, 170) overlaps it on this one (the union counts once)
TRACE = {"traceEvents": [
    span("ProfilerStep#1", 0, 100, cat="user_annotation"),
    span("aten::linear", 0, 60), span("aten::mm", 10, 40), span("c10d::allreduce_", 60, 30),
    span("ProfilerStep#2", 100, 100, cat="user_annotation"),
    span("aten::mm", 100, 30), span("record_param_comms", 130, 20, tid=2),
    span("gloo:all_reduce", 140, 30),
    {"ph": "i", "name": "[memory]", "ts": 5, "pid": 7, "tid": 1},  # not a span: ignored
]}


def test_self_time_top_ops_and_communication_share(tmp_path) -> None:
    path = tmp_path / "rank0.json"
    path.write_text(json.dumps(TRACE))
    got = summarize(path, 0)
    assert (got.steps, got.step_ms, got.device) == (2, 0.2, "cpu")
    # self time: mm 40 + 30 = 70 µs; linear 60 - 40 = 20; allreduce 30; gloo 30; comms 20
    assert dict(got.top) == pytest.approx({"aten::mm": 0.07, "c10d::allreduce_": 0.03,
                                           "gloo:all_reduce": 0.03, "aten::linear": 0.02,
                                           "record_param_comms": 0.02})
    assert got.top[0][0] == "aten::mm"
    # communication: [60, 90) + the union of [130, 150) and [140, 170) = 30 + 40 of 200 µs
    assert got.comm_share == pytest.approx(0.35)


def test_cuda_traces_count_nccl_kernels_against_all_kernels(tmp_path) -> None:
    trace = {"traceEvents": [span("ProfilerStep#1", 0, 100, cat="user_annotation"),
                             span("sm80_xmma_gemm", 0, 30, cat="kernel", tid=9),
                             span("ncclDevKernel_AllGather_RING_LL", 30, 10, cat="kernel",
                                  tid=9)]}
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "rank1.json").write_text(json.dumps(trace))
    got = summarize(tmp_path / "profile" / "rank1.json", 1)
    assert got.device == "cuda" and got.comm_share == pytest.approx(0.25)
    lines = profile_section(tmp_path)
    assert lines[-1].startswith("| 1 | 1 | 0.1 | 25.0 % of GPU kernel time | 75.0 % |")


def test_an_unprofiled_run_has_no_profile_section(tmp_path) -> None:
    assert profile_section(tmp_path) == []


@pytest.mark.parametrize(("start", "under", "recorded"), [
    (0, [1, 2, 3], [2, 3]),  # step 1 is the profiler's unrecorded warm-up
    (1, [2, 3], [2, 3]),  # resumed after step 1: the first step run is recorded, no warm-up
    (2, [3], [3]),  # resumed inside the range: the rest of it
    (3, [], []),  # resumed after it: nothing (said once)
])
def test_resumed_runs_profile_what_is_left_of_the_range(tmp_path, capsys, start, under,
                                                        recorded) -> None:
    import torch

    from orchestrator.run.profiling import make_profiler
    from tests.conftest import make_job

    job = make_job(["train.profile.steps=[2,3]", "train.steps=5"], run_dir=str(tmp_path))
    profiler = make_profiler(job, 0, "cpu", start)
    assert [s for s in range(start + 1, 6) if profiler.covers(s)] == under
    x = torch.ones(8, 8)
    for step in range(start + 1, 6):
        profiler.before(step)
        torch.mm(x, x)
        written = profiler.after(step)
        assert written == ([tmp_path / "profile" / "rank0.json"] if step == 3 and under else [])
    said = capsys.readouterr().out
    assert ("nothing is profiled in this attempt" in said) == (not under)
    if recorded:
        events = json.loads((tmp_path / "profile" / "rank0.json").read_text())["traceEvents"]
        steps = sorted(e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#"))
        assert len(steps) == len(recorded)
