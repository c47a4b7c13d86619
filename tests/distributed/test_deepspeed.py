"""Real DeepSpeed engines on 2 gloo ranks: every stage trains, matches DDP's fp32 losses and
holds the per-rank bytes the plan predicted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.distributed.checks import (
    RESTARTED,
    assert_memory_matches_plan,
    assert_resumed_once,
    losses,
    max_diff_from_reference,
    run_all,
)

STAGES = {
    "zero0": ["+recipe=ddp", "parallelism.backend=deepspeed"],
    "zero1": ["+recipe=deepspeed_zero1"],
    "zero2": ["+recipe=deepspeed_zero2", *RESTARTED],  # loses a rank at 14, resumes from 12
    "zero3": ["+recipe=deepspeed_zero3"],
    "zero3_offload": ["+recipe=deepspeed_zero3_offload"],
}
# Measured here: stages 0 and 3 reproduce DDP's fp32 losses exactly, 1, 2 and 3+offload within
# 4.8e-7 over 20 steps.
LOSS_TOL = 1e-5
MEMORY_TOL = 0.05


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return run_all(tmp_path_factory.mktemp("deepspeed"),
                   {name: [*o, "train.steps=20", "logging=none"] for name, o in STAGES.items()})


@pytest.mark.parametrize("stage", STAGES)
def test_stage_trains_and_matches_ddp_fp32_losses(runs, stage: str) -> None:
    got = losses(runs[stage])
    assert sum(got[-5:]) / 5 < sum(got[:5]) / 5 - 0.1
    assert max_diff_from_reference(runs[stage]) <= LOSS_TOL


def test_a_rank_killed_after_a_checkpoint_resumes_from_deepspeeds_own_checkpoint(runs) -> None:
    """ZeRO-2 resumed from step 12 (DeepSpeed's save/load_checkpoint) after rank 1 died at
    step 14: the losses stay within the stage's tolerance of the uninterrupted reference
    (measured 4.8e-7, as uninterrupted)."""
    assert_resumed_once(runs["zero2"])
    assert (runs["zero2"] / "checkpoints" / "step-00000020" / "deepspeed").is_dir()
    assert max_diff_from_reference(runs["zero2"]) <= 1e-6


@pytest.mark.parametrize("stage", STAGES)
def test_per_rank_bytes_match_the_plan(runs, stage: str) -> None:
    plan = json.loads((runs[stage] / "plan.json").read_text())
    assert plan["strategy"] == "deepspeed" and plan["deepspeed_config"] is not None
    assert_memory_matches_plan(runs[stage], MEMORY_TOL)


def test_fp32_master_partition_is_modelled(runs) -> None:
    """DeepSpeed keeps an fp32 master partition even for an fp32 model: ZeRO-1's optimizer
    bytes are 12 per owned element (master + two Adam moments), not 8."""
    plan = json.loads((runs["zero1"] / "plan.json").read_text())
    params = plan["compute"]["params"]
    opt = plan["memory"]["moments"]["after_backward"]["optimizer_bytes"]
    assert opt == pytest.approx(12 * params / 2, rel=0.01)


@pytest.mark.parametrize("recipe", ["deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3"])
def test_bf16_trains_close_to_fp32(tmp_path, recipe: str) -> None:
    proc = run_cli([f"+recipe={recipe}", "precision=bf16", "train.steps=20", "logging=none"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = losses(tmp_path)
    assert all(math.isfinite(v) for v in got) and got[-1] < got[0] - 0.1
    # Measured here: bf16 stays within 8.0e-4 of the fp32 losses on all three stages.
    assert max_diff_from_reference(tmp_path) < 5e-3
