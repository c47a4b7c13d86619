"""Real DeepSpeed engines on 2 gloo ranks: every stage trains, matches DDP's fp32 losses and
holds the per-rank bytes the plan predicted."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from orchestrator.common.records import read_metrics
from orchestrator.run.strategies.deepspeed_checkpoint import UNIVERSAL, WEIGHTS, Saved, reload_mode
from tests.conftest import make_job, run_ok
from tests.distributed.checks import (
    RESTARTED,
    assert_memory_matches_plan,
    assert_resumed_once,
    losses,
    max_diff_from_reference,
    run_all,
)

# Secrets the ZeRO-1 run carries (it also logs to W&B, offline): one in a DeepSpeed
# passthrough key (the comet monitor's api_key, which DeepSpeed validates but, disabled, does
# not use), one sourced from the environment by the config itself, and W&B's own key.
SECRET = "sk-test-ds-passthrough-5150"
ENV_SECRET = "sk-test-from-env-0042"
SECRETS = [f"+parallelism.deepspeed.comet.api_key={SECRET}",
           "+parallelism.deepspeed.comet.experiment_key=${oc.env:ORCH_TEST_EXPERIMENT_KEY}"]
SECRET_ENV = {"ORCH_TEST_EXPERIMENT_KEY": ENV_SECRET, "WANDB_API_KEY": "sk-test-wandb-7777"}
# gpt2_tiny's largest tensor (32,768 elements) is below DeepSpeed's default persistence
# threshold (1e5, generated), under which ZeRO-3 keeps a parameter whole on every rank: a lower
# one makes stage 3 partition most of it, so the plan's partitioned bytes and prefetched working
# set are checked (test_per_rank_bytes_match_the_plan), at DeepSpeed's default prefetch limits
PARTITIONED = ["+parallelism.deepspeed.zero_optimization.stage3_param_persistence_threshold=640"]
STAGES = {
    "zero0": ["+recipe=ddp", "parallelism.backend=deepspeed", "logging=none"],
    "zero1": ["+recipe=deepspeed_zero1", "logging=wandb_offline", *SECRETS],
    # loses a rank at 14, resumes from 12
    "zero2": ["+recipe=deepspeed_zero2", "logging=none", *RESTARTED],
    # kept: steps 16, 20
    "zero3": ["+recipe=deepspeed_zero3", "logging=none", "checkpoint.every_steps=8",
              *PARTITIONED],
    # prefetch, live and reuse limits below the model (DeepSpeed's defaults keep all of it
    # gathered from forward into backward): part of it stays (planning/memory.py replays it)
    "zero3_offload": ["+recipe=deepspeed_zero3_offload", "logging=none", *PARTITIONED,
                      *(f"+parallelism.deepspeed.zero_optimization.stage3_{key}=20000"
                        for key in ("prefetch_bucket_size", "max_reuse_distance")),
                      "+parallelism.deepspeed.zero_optimization.stage3_max_live_parameters=60000"],
}
# Measured here: stages 0 and 3 reproduce DDP's fp32 losses exactly, 1, 2 and 3+offload within
# 4.8e-7 over 20 steps. (bf16 under each stage: tests/distributed/test_precision_matrix.py.)
LOSS_TOL = 1e-5
MEMORY_TOL = 0.05


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return run_all(tmp_path_factory.mktemp("deepspeed"),
                   {name: [*o, "train.steps=20"] for name, o in STAGES.items()}, env=SECRET_ENV)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_trains_and_matches_ddp_fp32_losses(runs, stage: str) -> None:
    got = losses(runs[stage])
    assert sum(got[-5:]) / 5 < sum(got[:5]) / 5 - 0.1
    assert max_diff_from_reference(runs[stage]) <= LOSS_TOL


def test_no_stage_builds_deepspeeds_inference_comm_op(runs) -> None:
    """Training on CPU compiles nothing: DeepSpeed's shared-memory all-reduce, which only its
    inference uses, is neither built nor loaded (DeepSpeed prints its name when it is; the
    build took a minute of g++ in every new virtualenv)."""
    for stage in STAGES:
        for stream in ("stdout", "stderr"):
            assert "shm_comm" not in (runs[stage].parent / f"{stage}.{stream}").read_text()


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
    if stage == "zero3":  # most parameters really are partitioned: the check is not vacuous
        whole = 4 * plan["compute"]["params"]
        for rank in (0, 1):
            moments = json.loads((runs[stage] / "memory" / f"rank{rank}.json").read_text())
            held = moments["moments"]["after_backward"]["params_bytes"]
            assert 0.5 * whole < held < 0.6 * whole, (rank, held, whole)


def test_fp32_master_partition_is_modelled(runs) -> None:
    """DeepSpeed keeps an fp32 master partition even for an fp32 model: ZeRO-1's optimizer
    bytes are 12 per owned element (master + two Adam moments), not 8."""
    plan = json.loads((runs["zero1"] / "plan.json").read_text())
    params = plan["compute"]["params"]
    opt = plan["memory"]["moments"]["after_backward"]["optimizer_bytes"]
    assert opt == pytest.approx(12 * params / 2, rel=0.01)


def test_secrets_reach_no_file_and_no_output_stream(runs) -> None:
    """The W&B-logged ZeRO-1 run trained with its secrets in DeepSpeed's config (the ranks got
    them back through their environment): no file under the run dir, W&B's run files
    included, and neither of the launch's output streams holds any of them."""
    run_dir = runs["zero1"]
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))  # W&B did write
    assert "comet" in json.loads((run_dir / "deepspeed.json").read_text())
    files = [f for f in run_dir.rglob("*") if f.is_file()]
    streams = [run_dir.parent / f"zero1.{s}" for s in ("stdout", "stderr")]
    assert len(files) > 20 and all(s.stat().st_size for s in streams)
    for path in [*files, *streams]:
        data = path.read_bytes()
        for secret in (SECRET, *SECRET_ENV.values()):
            assert secret.encode() not in data, (path, secret)


# -- at another world size, and as a Hugging Face model (DeepSpeed's universal checkpoint and
# zero_to_fp32; run/strategies/deepspeed_checkpoint.py). The expected values are the 2-rank
# runs' own.
RESUMED_AT = 16  # kept by both runs below (checkpoints every 4 or 8 steps, the last two kept)
WORLD = {1: ["cluster.gpus_per_node=1", "train.micro_batch_size=8"],  # global batch 8 always
         4: ["cluster.gpus_per_node=4", "train.micro_batch_size=2"]}


def _digests(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


def _resumed_elsewhere(runs, stage: str, world: int, run_dir: Path) -> tuple[Path, str]:
    source = runs[stage] / "checkpoints" / f"step-{RESUMED_AT:08d}"
    before = _digests(source / "deepspeed")
    proc = run_ok([*STAGES[stage][:1], "logging=none", "train.save_model=false",
                    "train.steps=20", f"resume={source}", *WORLD[world]], run_dir)
    assert f"resumed from {source} (step {RESUMED_AT})" in proc.stdout
    assert "NOT carried" not in proc.stderr
    assert _digests(source / "deepspeed") == before  # converted beside it, never changed
    return source, proc.stdout


@pytest.mark.parametrize(("stage", "world"), [("zero2", 1), ("zero3", 4)])
def test_a_2_rank_checkpoint_resumes_at_another_world_size_with_its_optimizer_state(
        runs, stage: str, world: int, tmp_path: Path) -> None:
    """ZeRO partitions of 2 ranks loaded by 1 or 4: every step after the resume is the 2-rank
    run's (measured: at most 9.5e-7 apart; with Adam's moments restarted from zero instead the
    second resumed step moved by 3.4e-3). Converted once into <checkpoint>/universal."""
    source, out = _resumed_elsewhere(runs, stage, world, tmp_path)
    assert f"at world size {world} from a checkpoint saved at world size 2 (ZeRO-" in out
    assert f"loading its universal form {source / 'universal' / 'deepspeed'}" in out
    assert losses(tmp_path) == pytest.approx(losses(runs[stage])[RESUMED_AT:], abs=LOSS_TOL)


def test_a_checkpoint_the_universal_format_cannot_carry_resumes_with_the_weights_alone(
        runs, tmp_path: Path) -> None:
    """ZeRO-2's 2-rank checkpoint resumed under ZeRO-3 (which DeepSpeed 0.19's universal
    format does not cross): the consolidated weights are loaded, with a warning that Adam's
    moments restart. Step 17's loss is the loaded weights' own, before any update: the 2-rank
    run's step 17 (measured: equal). From step 18 on the fresh moments show (Adam's first
    update is lr-sized per element): the losses leave the run's by more than 1e-4, yet stay
    within 0.05 of it (measured: 8.3e-4, 1.0e-2, 7.8e-3 at steps 18-20)."""
    source = runs["zero2"] / "checkpoints" / f"step-{RESUMED_AT:08d}"
    proc = run_ok(["+recipe=deepspeed_zero3", "logging=none", "train.save_model=false",
                   "train.steps=20", f"resume={source}"], tmp_path)
    assert ("(ZeRO-3, saved with ZeRO-2): only the weights were loaded; the optimizer state "
            "(adamw) was NOT carried and restarts from zero") in proc.stderr
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == list(range(17, 21))
    got, carried = losses(tmp_path), losses(runs["zero2"])[RESUMED_AT:]
    assert got[0] == pytest.approx(carried[0], abs=1e-5)
    jumps = [abs(a - b) for a, b in zip(got[1:], carried[1:], strict=True)]
    assert max(jumps) > 1e-4 and max(jumps) < 0.05, jumps


def test_the_universal_conversion_is_deterministic(runs, tmp_path: Path) -> None:
    from orchestrator.run.strategies.deepspeed_checkpoint import convert_to_universal

    source = runs["zero2"] / "checkpoints" / f"step-{RESUMED_AT:08d}"
    for name in ("a", "b"):
        convert_to_universal(source / "deepspeed", tmp_path / name)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert "deepspeed/zero/optimizer_state.pt" in _digests(tmp_path / "a")


@pytest.mark.parametrize(("saved", "overrides", "world", "mode"), [
    (Saved(2, 2, "adamw"), ["+recipe=deepspeed_zero2"], 1, UNIVERSAL),
    (Saved(2, 1, "adamw"), ["+recipe=deepspeed_zero2"], 2, UNIVERSAL),  # ZeRO-1 -> 2
    (Saved(2, 3, "adamw"), ["+recipe=deepspeed_zero3"], 4, UNIVERSAL),
    (Saved(2, 2, "adamw"), ["+recipe=deepspeed_zero2", "optim.name=sgd"], 1, WEIGHTS),
    (Saved(2, 2, "adamw"), ["+recipe=deepspeed_zero3"], 2, WEIGHTS),  # across ZeRO-3
    (Saved(2, 0, "adamw"), ["+recipe=deepspeed_zero2"], 2, WEIGHTS),  # from whole replicas
])
def test_what_deepspeeds_universal_checkpoint_cannot_carry_reloads_the_weights_alone(
        saved: Saved, overrides: list[str], world: int, mode: str) -> None:
    """DeepSpeed 0.19's universal format holds Adam's moments only and does not cross stage 0
    or stage 3 (measured by resuming each case: e.g. SGD fails inside ds_to_universal with
    KeyError 'exp_avg'); those resume from the consolidated weights with a warning."""
    assert reload_mode(saved, make_job(overrides), world)[0] == mode


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_export_of_a_deepspeed_checkpoint_equals_the_trained_model(runs, stage: str) -> None:
    """`action=export` (in this process) of the last checkpoint (2 ZeRO partitions) gives the
    weights the run saved at its end."""
    from transformers import AutoModelForCausalLM

    from orchestrator.run.checkpoint.export import export

    run = runs[stage]
    exported = export(make_job(["action=export", f"run_dir={run}"]))
    assert exported == run / "export" / "step-00000020" / "model"
    ids = torch.arange(32).view(2, 16)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(run / "model").eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(exported).eval()(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
