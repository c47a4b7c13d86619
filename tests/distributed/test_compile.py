"""`train.compile=true`: every transformer block compiled (inductor; on CPU it builds C++),
under DDP and FSDP2 on 2 real gloo ranks through the real CLI. The losses must stay within
1e-4 of the stored eager reference, and the compile time is logged apart from the steps."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from orchestrator.common.errors import ConfigError
from orchestrator.common.records import read_metrics
from orchestrator.config.derived import Hardware
from orchestrator.planning.preflight import validate
from tests.conftest import make_job, run_ok
from tests.distributed.checks import losses, max_diff_from_reference

pytestmark = pytest.mark.slow

RECIPES = ["ddp", "fsdp_zero3"]
# Measured on this machine kind: both differ from the eager reference by at most 9.5e-7
# (inductor fuses and reorders reductions); the issue asks for 1e-4.
LOSS_TOL = 1e-4
COMMON = ["train.compile=true", "logging=none", "train.save_model=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Each recipe once, compiled (20 steps, 2 ranks); prints each run's wall time. The
    second run finds the first's kernels in inductor's cache (TORCHINDUCTOR_CACHE_DIR)."""
    root = tmp_path_factory.mktemp("compile")
    out = {}
    for recipe in RECIPES:
        began = time.perf_counter()
        run_ok([f"+recipe={recipe}", *COMMON], root / recipe)
        print(f"compiled {recipe}: {time.perf_counter() - began:.1f} s")
        out[recipe] = root / recipe
    return out


def compile_event(run_dir: Path) -> dict:
    events = [e for e in read_metrics(run_dir / "metrics.jsonl", events=True)
              if e["event"] == "compile"]
    assert len(events) == 1, "no compile event: the blocks were not compiled"
    return events[0]


@pytest.mark.parametrize("recipe", RECIPES)
def test_compiled_losses_match_eager(runs, recipe: str) -> None:
    assert len(losses(runs[recipe])) == 20
    assert max_diff_from_reference(runs[recipe]) <= LOSS_TOL


@pytest.mark.parametrize("recipe", RECIPES)
def test_blocks_compiled_and_compile_time_kept_out_of_steps(runs, recipe: str) -> None:
    event = compile_event(runs[recipe])
    assert event["compiled_blocks"] == 2  # gpt2_tiny's two blocks
    assert event["compiled_graphs"] >= 1  # dynamo really compiled (one graph serves both)
    # the warm-up compiled before step 1: no step's time, hence tokens/s, includes it
    steps = read_metrics(runs[recipe] / "metrics.jsonl")
    assert max(r["step_time_s"] for r in steps) < event["compile_s"]


@pytest.mark.parametrize(("overrides", "reason"), [
    (["+recipe=deepspeed_zero2"], "deepspeed"),
    (["train.task=evaluate", "eval.holdout=0.1"], "train.task=evaluate"),
])
def test_compile_refused_where_unsupported(overrides: list[str], reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(make_job([*overrides, "train.compile=true"]), Hardware())
    assert e.value.key == "train.compile"
    assert reason in str(e.value) and "\n" not in str(e.value)


def test_compile_on_cpu_needs_a_cxx_compiler(monkeypatch) -> None:
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    with pytest.raises(ConfigError, match="no-such-c\\+\\+-compiler"):
        validate(make_job(["train.compile=true", "cluster.device=cpu"]), Hardware())


@pytest.mark.parametrize("recipe", ["ddp", "zero1", "fsdp_zero2", "fsdp_zero3"])
def test_compile_accepted_for_torch_strategies(recipe: str) -> None:
    validate(make_job([f"+recipe={recipe}", "train.compile=true"]), Hardware())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("recipe", RECIPES)
def test_compiled_matches_eager_on_one_gpu(tmp_path, recipe: str) -> None:
    """Inductor's Triton kernels against eager, fp32, one GPU."""
    got = {}
    for name, extra in {"eager": [], "compiled": ["train.compile=true"]}.items():
        run_ok([f"+recipe={recipe}", "cluster.device=cuda", "cluster.gpus_per_node=1",
                        "logging=none", "train.save_model=false", *extra], tmp_path / name)
        got[name] = losses(tmp_path / name)
    assert max(abs(a - b) for a, b in zip(got["eager"], got["compiled"], strict=True)) <= LOSS_TOL
    assert compile_event(tmp_path / "compiled")["compiled_graphs"] >= 1
