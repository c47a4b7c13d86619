"""Pipeline parallelism composed with data and tensor parallelism on real gloo ranks, a 4-block
llama_tiny: 2 stages x 2 data-parallel ranks, the stage's gradients averaged after the schedule
or sharded by FSDP2 ZeRO-2; 2 ranks holding 2 stages each (interleaved 1F1B, ZB-V). (2 stages
x 2 tensor-parallel ranks: test_tensor_parallel_gpt2.py.) Each trains like 2-rank DDP on the same 8
samples per step and evaluates the same held-out loss; a checkpoint of 4 stages (one rank each)
resumes as 2 stages x FSDP2; every rank holds its planned bytes.

The DDP run is the reference: test_reference_loop.py checks our DDP against a plain PyTorch loop
written without our code."""

from __future__ import annotations

import pytest

from orchestrator.common.records import read_metrics
from tests.conftest import run_ok
from tests.distributed.checks import assert_memory_matches_plan, losses

# 256 held-out sequences (1/16 of 4096), evaluated whole at steps 6 and 12 by every layout
COMMON = ["model=llama_tiny", "model.n_layer=4", "logging=none", "train.steps=12",
          "train.save_model=false", "eval.holdout=0.0625", "eval.every_steps=6",
          "eval.max_batches=64"]
# schedules with 2 stages per rank (interleaved_zb: interleaved_1f1b's placement with zbv's
# split backward, both checked here)
MULTI = ("interleaved_1f1b", "zbv")
FOUR = ["cluster.gpus_per_node=4", "train.micro_batch_size=4"]  # 2 data-parallel ranks x 4
LAYOUTS = {
    "ddp": ["+recipe=ddp"],  # 2 ranks x 4 samples
    "pp4": ["cluster.gpus_per_node=4", "parallelism.pipeline_parallel=4",
            "train.micro_batch_size=8", "parallelism.pipeline_schedule=1f1b",
            "checkpoint.every_steps=6"],
    "pp2_ddp2": [*FOUR, "parallelism.pipeline_parallel=2", "parallelism.pipeline_microbatches=2"],
    # 2 ranks x 2 stages of one block: rank 0 holds blocks 0 and 2, rank 1 blocks 1 and 3
    # (zbv, V-shaped: rank 0 blocks 0 and 3, with the embedding, the final norm and the head)
    **{schedule: ["parallelism.pipeline_parallel=2", "train.micro_batch_size=8",
                  f"parallelism.pipeline_schedule={schedule}",
                  "parallelism.pipeline_microbatches=4"] for schedule in MULTI},
}
PP2_FSDP2 = [*FOUR, "parallelism.pipeline_parallel=2", "parallelism.pipeline_schedule=gpipe",
             "parallelism.pipeline_microbatches=2", "parallelism.zero_stage=2"]
LOSS_TOL = 1e-5


@pytest.fixture(scope="module")
def runs(shared_run):
    return {name: shared_run([*COMMON, *overrides]) for name, overrides in LAYOUTS.items()}


@pytest.fixture(scope="module")
def resumed(runs, tmp_path_factory):
    """pp4's step-6 checkpoint resumed as 2 stages x FSDP2 ZeRO-2: steps 7-12."""
    out = tmp_path_factory.mktemp("pp2_fsdp2")
    saved = runs["pp4"] / "checkpoints" / "step-00000006"
    run_ok([*COMMON, *PP2_FSDP2, f"resume={saved}", "debug.memory_probe_step=8"], out)
    return out


def _max_diff(got: list[float], ref: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(got, ref, strict=True))


@pytest.mark.parametrize("layout", ["pp4", "pp2_ddp2", *MULTI])
def test_stages_with_data_parallel_ranks_train_like_ddp(runs, layout: str) -> None:
    """Within 1e-5 for 12 steps; the loss must move. A pipeline whose data-parallel ranks read
    the same data, or skipped DDP's average, would drift at once."""
    ref, got = losses(runs["ddp"]), losses(runs[layout])
    assert len(got) == 12 and ref[-1] < ref[0] - 0.2
    assert _max_diff(got, ref) <= LOSS_TOL


@pytest.mark.parametrize("layout", ["pp4", "pp2_ddp2", "pp2_fsdp2", *MULTI])
def test_evaluation_runs_through_the_pipeline(runs, resumed, layout: str) -> None:
    """The held-out loss and accuracy at step 12 (the stages' forward, sent rank to rank) equal
    DDP's within 1e-5: every layout scores the same 256 sequences once."""
    def val(run) -> dict[str, float]:
        last = [m for m in read_metrics(run / "metrics.jsonl") if "val/loss" in m][-1]
        return {k: last[k] for k in ("step", "val/loss", "val/accuracy")}

    ref, got = val(runs["ddp"]), val(resumed if layout == "pp2_fsdp2" else runs[layout])
    assert got["step"] == ref["step"] == 12
    assert abs(got["val/loss"] - ref["val/loss"]) <= LOSS_TOL
    assert abs(got["val/accuracy"] - ref["val/accuracy"]) <= LOSS_TOL


def test_a_four_stage_checkpoint_resumes_as_two_stages_under_fsdp(runs, resumed) -> None:
    """Each of 4 stages wrote its blocks under their full names; 2 stages of 2 blocks, each
    sharded over 2 ranks, load them (weights and AdamW state) and continue as DDP did."""
    got = losses(resumed)
    assert len(got) == 6
    assert _max_diff(got, losses(runs["ddp"])[6:]) <= LOSS_TOL


@pytest.mark.parametrize("layout", ["pp2_ddp2", "pp2_fsdp2", *MULTI])
def test_each_rank_holds_its_planned_bytes(runs, resumed, layout: str) -> None:
    """Replicated: each stage's parameters, gradients and optimizer state whole on both of its
    ranks; FSDP2: half of each, gathered only inside the schedule; TP: each rank its slices of
    its stage; 2 stages per rank: each rank its two stages' (the plan describes the heaviest
    rank)."""
    run = resumed if layout == "pp2_fsdp2" else runs[layout]
    assert_memory_matches_plan(run, 0.02, ranks=2 if layout in MULTI else 4)
