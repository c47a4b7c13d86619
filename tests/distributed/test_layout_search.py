"""The layout search (`search=layout`) with real processes: gpt2_tiny on 2 ranks, DDP and FSDP2
ZeRO-3 each at micro batch 2 and 1 (the global batch of 4 kept), planned against a per-rank
memory that the largest of the four does not fit. Read back independently: the layouts the
planner refused are listed with the reason and none of them ran (each trial's own config.yaml
says what it ran); every other layout ran; the best is the fastest by the median tokens/s
after the first step that the test computes from each trial's metrics file."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import pytest
import yaml

from orchestrator.common.records import read_metrics
from orchestrator.planning.layouts import enumerate_layouts
from orchestrator.planning.plan import make_plan
from tests.conftest import make_job, run_ok

LAYOUT = ["action=search", "search=layout", "search.layouts=[ddp,fsdp_zero3]", "model=gpt2_tiny",
          "train.steps=5", "train.global_batch_size=4", "train.micro_batch_size=2", "logging=none",
          "train.save_model=false"]


def _planned_peaks() -> dict[tuple[int, int], int]:
    """(ZeRO stage, micro batch) -> the planner's per-rank peak, with no memory limit."""
    job = make_job(LAYOUT)
    fitting, _ = enumerate_layouts(job, [], "cpu", lambda j: make_plan(j, "cpu", 2))
    return {(f.plan.zero_stage, f.plan.micro_batch_size): f.plan.memory.peak_total_bytes
            for f in fitting}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, dict[tuple[int, int], int], int]:
    peaks = _planned_peaks()
    assert len(peaks) == 4
    limit = max(peaks.values()) - 1  # the largest layout does not fit
    out = tmp_path_factory.mktemp("layouts") / "study"
    run_ok([*LAYOUT, f"search.device_memory_mb={limit / 2**20!r}"], out)
    return out, peaks, limit


def _ran(trial_dir: Path) -> tuple[int, int]:
    cfg = yaml.safe_load((trial_dir / "config.yaml").read_text())
    return cfg["parallelism"]["zero_stage"], cfg["train"]["micro_batch_size"]


def _tokens_per_s(trial_dir: Path) -> float:
    values = [r["tokens_per_s"] for r in read_metrics(trial_dir / "metrics.jsonl")
              if r["step"] >= 2]
    return statistics.median(values)


def test_refused_layouts_are_listed_and_never_launched(study) -> None:
    out, peaks, limit = study
    too_big = {key for key, peak in peaks.items() if peak > limit}
    assert len(too_big) == 1
    plan = json.loads((out / "search_plan.json").read_text())
    assert len(plan["refused"]) == 1 and "needs " in plan["refused"][0]["reason"]
    ran = [_ran(d) for d in sorted(out.glob("trial-*")) if d.is_dir()]
    assert sorted(ran) == sorted(set(peaks) - too_big)  # every other layout, each once


def test_the_best_layout_is_the_fastest_measured(study) -> None:
    out, _, _ = study
    trials = json.loads((out / "search_summary.json").read_text())["trials"]
    assert all(t["state"] == "COMPLETE" and t["steps"] == 5 for t in trials)
    measured = {t["number"]: _tokens_per_s(Path(t["run_dir"])) for t in trials}
    for t in trials:
        assert t["value"] == pytest.approx(measured[t["number"]], rel=1e-12)
    assert trials[0]["number"] == max(measured, key=measured.__getitem__)
    best = yaml.safe_load((out / "best.yaml").read_text())
    stage, micro = _ran(Path(trials[0]["run_dir"]))
    assert f"parallelism.zero_stage={stage}" in best["overrides"]
    assert f"train.micro_batch_size={micro}" in best["overrides"]


def test_a_bad_layout_search_is_one_line() -> None:
    from orchestrator.common.errors import ConfigError
    from orchestrator.config.search import check_search

    for overrides, want in [
        (["search.metric=loss"], "config key 'search.metric' has value 'loss'; allowed: "
         "tokens_per_s for search.objective=throughput"),
        (["search.parallel=2"], "config key 'search.parallel' has value 2; allowed: 1 for "
         "search.objective=throughput with launcher=local"),
        (["+search.params.optim.lr='interval(1e-4, 1e-3)'"], "config key "
         "'search.params.optim.lr' has value"),
    ]:
        job = make_job([*LAYOUT, *overrides])
        with pytest.raises(ConfigError) as err:
            check_search(job, dataclasses.asdict(job))
        assert str(err.value).startswith(want), str(err.value)
    job = make_job([*LAYOUT, "search.layouts=[ddp,zero9]"])
    with pytest.raises(ConfigError, match="not zero9"):
        enumerate_layouts(job, [], "cpu", lambda j: make_plan(j, "cpu", 2))
