"""Other real runs: the process grows by the planned model state, pure bf16's memory, gradient
accumulation, one rank with text data, rank failure. (Mixed precision under every strategy:
tests/distributed/test_precision_matrix.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from orchestrator.common.lifeline import processes_with_env
from orchestrator.planning.plan import make_plan
from tests.conftest import REPO, cli_command, make_job, run_cli, run_ok
from tests.distributed.checks import assert_memory_matches_plan, losses, max_diff_from_reference


@pytest.mark.parametrize("recipe", ["ddp", "fsdp_zero3"])
def test_pure_bf16_halves_model_state(tmp_path, recipe: str) -> None:
    run_ok([f"+recipe={recipe}", "precision=bf16_pure", "logging=none"], tmp_path)
    got = losses(tmp_path)
    assert got[-1] < got[0] - 0.1
    assert max_diff_from_reference(tmp_path) < 0.03  # measured: 7.2e-3 for both
    assert_memory_matches_plan(tmp_path, 0.02)
    fp32 = make_plan(make_job([f"+recipe={recipe}"]), "cpu", 2).memory.peak_bytes
    planned = json.loads((tmp_path / "plan.json").read_text())["memory"]["peak_bytes"]
    assert planned == pytest.approx(fp32 / 2, rel=0.01)


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_sgd_optimizer_state_matches_the_plan(tmp_path, momentum: float) -> None:
    run_ok(["+recipe=zero1", "optim.name=sgd", "optim.lr=0.1",
                    f"optim.momentum={momentum}", "logging=none"], tmp_path)
    assert_memory_matches_plan(tmp_path, 0.02)
    opt = json.loads((tmp_path / "plan.json").read_text())["memory"]["moments"]
    assert (opt["after_backward"]["optimizer_bytes"] == 0) == (momentum == 0)


# Starts the command in argv[2:] and writes "<exit code> <ru_maxrss KiB>" of its process tree to
# argv[1]. A process started by fork or vfork counts its parent's resident set until it execs
# (Linux keeps the larger), so the launch is started from this small process, not from pytest's.
MEASURE = ("import os, sys; pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ); "
           "_, status, use = os.wait4(pid, 0); open(sys.argv[1], 'w').write("
           "f'{os.waitstatus_to_exitcode(status)} {use.ru_maxrss}')")


def peak_rss(overrides: list[str], run_dir: Path) -> int:
    """The largest resident set any process of the launch reached (the CLI, or the rank it
    starts), in bytes: the kernel's own count (ru_maxrss of the waited-for process tree, from
    os.wait4), which shares nothing with what the ranks measure of their tensors."""
    log, result = (run_dir.parent / f"{run_dir.name}.{s}" for s in ("log", "rss"))
    with log.open("w") as out:
        subprocess.run([sys.executable, "-c", MEASURE, str(result),
                        *cli_command(overrides, run_dir)], cwd=REPO, stdout=out,
                       stderr=subprocess.STDOUT, check=True, timeout=600)
    code, kib = map(int, result.read_text().split())
    assert code == 0, log.read_text()[-3000:]
    return kib * 1024


def test_the_process_grows_by_the_planned_model_state(tmp_path) -> None:
    """One rank, AdamW, fp32, where model state dominates: GPT-2 at 4 x 1024 (51M parameters,
    16 bytes each: weights, gradients, two moments) against the same launch of gpt2_tiny.
    The growth of the process's peak resident set must be the growth of the planned peak: not
    less (a plan counting state the run never allocates), and not more than 20 % above
    (measured 7-9 % above: the optimizer's per-tensor temporaries and the allocator; one more
    copy of the weights would be 25 %, of the gradients too)."""
    one = ["+recipe=ddp", "cluster.gpus_per_node=1", "data.seq_len=16",
           "train.micro_batch_size=1", "train.global_batch_size=1", "train.steps=2",
           "optim.warmup_steps=0", "train.save_model=false", "logging=none"]
    wide = ["model.n_layer=4", "model.d_model=1024", "model.n_head=16"]
    rss = {name: peak_rss([*one, *extra], tmp_path / name)
           for name, extra in (("tiny", []), ("wide", wide))}
    planned = {name: json.loads((tmp_path / name / "plan.json").read_text())["memory"]
               ["peak_bytes"] for name in rss}
    params = json.loads((tmp_path / "wide" / "plan.json").read_text())["compute"]["params"]
    assert planned["wide"] == pytest.approx(16 * params, rel=0.01)  # state dominates the plan
    grown, want = rss["wide"] - rss["tiny"], planned["wide"] - planned["tiny"]
    assert want <= grown <= 1.2 * want, (grown, want)


def test_gradient_accumulation_matches_a_larger_micro_batch(tmp_path) -> None:
    """2 micro batches of 2 with FSDP2 equal one of 4 (that the first skips gradient sync is
    observed in tests/unit/test_observed_features.py)."""
    run_ok(["+recipe=fsdp_zero2", "train.micro_batch_size=2",
                    "train.global_batch_size=8", "logging=none"], tmp_path)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert (plan["micro_batch_size"], plan["grad_accum_steps"]) == (2, 2)
    assert max_diff_from_reference(tmp_path) < 1e-5


def test_one_rank_runs_without_torchrun_on_real_text(tmp_path) -> None:
    run_ok(["+recipe=ddp", "cluster.gpus_per_node=1", "data=text", "train.steps=20",
                    "logging=none"], tmp_path)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["world_size"] == 1 and "torch.distributed.run" not in plan["commands"][0]
    got = losses(tmp_path)
    assert len(got) == 20 and sum(got[-5:]) / 5 < sum(got[:5]) / 5 - 0.3


def test_rank_failure_is_a_clear_error_and_leaves_no_process(tmp_path) -> None:
    marker = f"ORCH_TEST_{uuid.uuid4().hex}"
    proc = run_cli(["+recipe=ddp", "debug.crash_at_step=3", "debug.crash_rank=1"], tmp_path,
                   env={"ORCH_TEST_MARKER": marker})
    assert proc.returncode == 2
    assert "InjectedCrash: debug.crash_at_step=3 on rank 1" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: training failed with exit code")
    deadline = time.monotonic() + 10
    while processes_with_env("ORCH_TEST_MARKER", marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_with_env("ORCH_TEST_MARKER", marker) == []
    assert len(losses(tmp_path)) == 2  # rank 0 logged the two steps before the crash
