"""Pipeline parallelism before launch: the refusals (one line each), the split into stages,
and the plan's bubble, stage memory and in-flight activations against the formulas written out
here (GPipe holds every micro-batch, 1F1B at most P on the first stage). The runs:
tests/distributed/test_pipeline.py."""

from __future__ import annotations

import pytest

from orchestrator.common.errors import ConfigError
from orchestrator.config.derived import Hardware
from orchestrator.models.pipeline import stage_blocks
from orchestrator.planning.activations import activation_bytes
from orchestrator.planning.plan import make_plan
from orchestrator.planning.preflight import validate
from tests.conftest import make_job

PP2 = ["model=llama_tiny", "parallelism.pipeline_parallel=2", "train.micro_batch_size=8"]

REFUSED = {
    "world": (["model=llama_tiny", "parallelism.pipeline_parallel=2", "cluster.gpus_per_node=3"],
              "config key 'parallelism.pipeline_parallel' has value 2; allowed: a divisor of the "
              "world size 3 (nodes x gpus_per_node; each stage runs on world / "
              "pipeline_parallel ranks)"),
    "stages x TP beyond the world": (
        [*PP2, "model.n_layer=4", "cluster.gpus_per_node=4", "parallelism.pipeline_parallel=4",
         "parallelism.tensor_parallel=2"],
        "config key 'parallelism.pipeline_parallel' has value 4; allowed: a divisor of the "
        "world size 4 / parallelism.tensor_parallel 2"),
    "interleaved with tensor parallelism": (
        [*PP2, "model.n_layer=4", "cluster.gpus_per_node=4", "parallelism.tensor_parallel=2",
         "parallelism.pipeline_schedule=interleaved_1f1b"],
        "config key 'parallelism.tensor_parallel' has value 2; allowed: 1 with "
        "pipeline_schedule=interleaved_1f1b (several stages per rank split over "
        "tensor-parallel groups are not built yet)"),
    "family": (["model=bert_tiny", "parallelism.pipeline_parallel=2"],
               "config key 'parallelism.pipeline_parallel' has value 2; allowed: 1 for "
               "model.family=bert (pipeline parallelism is built for: llama, gpt2)"),
    "more stages than blocks": (
        [*PP2, "cluster.gpus_per_node=4", "parallelism.pipeline_parallel=4"],
        "config key 'parallelism.pipeline_parallel' has value 4; allowed: at most "
        "model.n_layer=2 / 1 stages per rank (each stage holds whole blocks)"),
    "interleaved, more stages than blocks": (
        [*PP2, "parallelism.pipeline_schedule=interleaved_1f1b",
         "parallelism.pipeline_stages_per_rank=2"],
        "config key 'parallelism.pipeline_parallel' has value 2; allowed: at most "
        "model.n_layer=2 / 2 stages per rank (each stage holds whole blocks)"),
    "interleaved with one stage per rank": (
        [*PP2, "model.n_layer=4", "parallelism.pipeline_schedule=interleaved_1f1b",
         "parallelism.pipeline_stages_per_rank=1"],
        "config key 'parallelism.pipeline_stages_per_rank' has value 1; allowed: at least 2 "
        "with pipeline_schedule=interleaved_1f1b (it interleaves several stages per rank)"),
    "stages per rank without interleaving": (
        [*PP2, "model.n_layer=4", "parallelism.pipeline_stages_per_rank=2"],
        "config key 'parallelism.pipeline_stages_per_rank' has value 2; allowed: 1 with "
        "pipeline_schedule=1f1b (one stage per rank; interleaved_1f1b, interleaved_zb and zbv "
        "run several)"),
    "interleaved under FSDP2": (
        [*PP2, "model.n_layer=4", "cluster.gpus_per_node=4", "train.micro_batch_size=4",
         "parallelism.pipeline_schedule=interleaved_1f1b", "parallelism.zero_stage=2"],
        "config key 'parallelism.zero_stage' has value 2; allowed: 0 with "
        "parallelism.pipeline_stages_per_rank=2 (FSDP2 over several stages per rank is not "
        "built yet)"),
    "too few micro-batches": (
        [*PP2, "parallelism.pipeline_microbatches=1"],
        "config key 'parallelism.pipeline_microbatches' has value 1; allowed: at least "
        "parallelism.pipeline_parallel=2 (with fewer, some stage is idle all step)"),
    "uneven micro-batches": (
        [*PP2, "parallelism.pipeline_microbatches=3"],
        "config key 'parallelism.pipeline_microbatches' has value 3; allowed: a divisor of the "
        "batch each step runs through the pipeline (micro_batch_size x grad_accum_steps = 8)"),
    "ZeRO-3 stages": (
        [*PP2, "cluster.gpus_per_node=4", "parallelism.zero_stage=3"],
        "config key 'parallelism.zero_stage' has value 3; allowed: 0 or 2 with "
        "parallelism.pipeline_parallel=2 (the pipeline schedule keeps each stage's parameters "
        "gathered from its first micro-batch to its last, so ZeRO-3 would hold what ZeRO-2 "
        "holds and gather them more often)"),
    "DeepSpeed stages": (
        [*PP2, "+recipe=deepspeed_zero2"],
        "config key 'parallelism.backend' has value 'deepspeed'; allowed: torch with "
        "parallelism.pipeline_parallel=2"),
    "compile": ([*PP2, "train.compile=true"],
                "config key 'train.compile' has value True; allowed: false with "
                "parallelism.pipeline_parallel=2 (pipeline parallelism runs eager; tensor "
                "parallelism alone takes train.compile)"),
    "lora": ([*PP2, "lora.rank=4"],
             "config key 'lora.rank' has value 4; allowed: not with "
             "parallelism.pipeline_parallel=2 yet (pipeline parallelism trains"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_each_impossible_pipeline_is_one_line(case: str) -> None:
    overrides, want = REFUSED[case]
    with pytest.raises(ConfigError) as err:
        validate(make_job(overrides), Hardware())
    line = str(err.value)
    assert "\n" not in line and line.startswith(want), line


def test_blocks_split_evenly_with_the_extra_ones_in_the_middle() -> None:
    assert stage_blocks(2, 2) == [range(0, 1), range(1, 2)]
    assert stage_blocks(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    # 10 blocks on 4 stages: the two extra go to stages 1 and 2, beside neither the embedding
    # nor the head
    assert [len(r) for r in stage_blocks(10, 4)] == [2, 3, 3, 2]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_the_plan_counts_the_bubble_and_the_micro_batches_in_flight(schedule: str) -> None:
    """4 stages of 2 blocks (8 layers), 8 micro-batches of 2: bubble (P-1)/(M+P-1) = 3/11;
    the most any stage holds is GPipe's 8 micro-batches of its 2 blocks (+ logits on the last
    stage), or 1F1B's 4 on the first stage, each micro-batch as a whole model's per layer."""
    job = make_job(["model=llama_tiny", "model.n_layer=8", "cluster.gpus_per_node=4",
                    "parallelism.pipeline_parallel=4", f"parallelism.pipeline_schedule={schedule}",
                    "parallelism.pipeline_microbatches=8", "train.micro_batch_size=16"])
    plan = make_plan(job, "cpu", 4)
    assert plan.pipeline["bubble_fraction"] == pytest.approx(3 / 11)
    assert plan.pipeline["microbatch_size"] == 2
    assert plan.mesh == "pp 4 x 1 replica"
    one = make_job(["model=llama_tiny", "model.n_layer=8", "train.micro_batch_size=2"])
    per_layer = (activation_bytes(one) - activation_bytes(make_job([
        "model=llama_tiny", "model.n_layer=0", "train.micro_batch_size=2"]))) // 8
    logits = activation_bytes(make_job(["model=llama_tiny", "model.n_layer=0",
                                        "train.micro_batch_size=2"]))
    want = 8 * (2 * per_layer + logits) if schedule == "gpipe" else 4 * 2 * per_layer
    assert plan.memory.activations_bytes == want


def test_the_plan_of_an_interleaved_pipeline() -> None:
    """2 ranks x 2 stages of 2 blocks (8 layers), 4 micro-batches of 2: bubble
    (P-1)/(V·M+P-1) = 1/9. In flight, from torch's interleaved warm-up
    ((V-1)·M/rounds + 2·(P-1-r) stage-forwards, rounds = M/P, then one more): rank 0 holds 5
    stage-micro-batches of 2 blocks, rank 1 3 and their logits; the plan takes the larger."""
    job = make_job(["model=llama_tiny", "model.n_layer=8", "parallelism.pipeline_parallel=2",
                    "parallelism.pipeline_schedule=interleaved_1f1b",
                    "parallelism.pipeline_microbatches=4", "train.micro_batch_size=8"])
    plan = make_plan(job, "cpu", 2)
    assert plan.pipeline["bubble_fraction"] == pytest.approx(1 / 9)
    assert (plan.pipeline["stages"], plan.pipeline["stages_per_rank"]) == (4, 2)
    one = make_job(["model=llama_tiny", "model.n_layer=8", "train.micro_batch_size=2"])
    empty = make_job(["model=llama_tiny", "model.n_layer=0", "train.micro_batch_size=2"])
    per_layer = (activation_bytes(one) - activation_bytes(empty)) // 8
    logits = activation_bytes(empty)
    assert plan.memory.activations_bytes == max(5 * 2 * per_layer,
                                                3 * 2 * per_layer + 3 * logits)

