"""The three model families train 2 ranks on the shipped corpus under DDP and ZeRO-3, with
their own objectives, their model state matches the plan, and the encoders' held-out scores
agree across strategies."""

from __future__ import annotations

import math

import pytest

from orchestrator.common.errors import ConfigError
from orchestrator.common.records import read_metrics
from orchestrator.config.derived import Hardware
from orchestrator.planning.preflight import validate
from tests.conftest import make_job
from tests.distributed.checks import assert_memory_matches_plan, losses


def pretraining(recipe: str, parallelism: str) -> list[str]:
    """The family's 20-step pre-training run; the encoders score the held-out share at its last
    step (`eval.every_steps`). The causal one is test_lifecycle.py's pre-training run too."""
    held_out = [] if recipe == "causal_lm" else ["eval.every_steps=20"]
    return [f"+recipe={recipe}", f"parallelism={parallelism}", "logging=none", *held_out]


@pytest.fixture(scope="module")
def trained(shared_run):
    return lambda recipe, parallelism: shared_run(pretraining(recipe, parallelism))


@pytest.mark.parametrize("parallelism", ["ddp", "zero3"])
@pytest.mark.parametrize("recipe", ["causal_lm", "masked_lm", "span_corruption"])
def test_family_trains_on_the_corpus(trained, recipe: str, parallelism: str) -> None:
    run_dir = trained(recipe, parallelism)
    got = losses(run_dir)
    assert len(got) == 20 and sum(got[-5:]) / 5 < sum(got[:5]) / 5 - 0.5
    assert_memory_matches_plan(run_dir, 0.02)


@pytest.mark.parametrize(("model", "objective"), [("gpt2_tiny", "mlm"), ("bert_tiny", "causal"),
                                                  ("t5_tiny", "mlm")])
def test_objective_must_fit_the_family(model: str, objective: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(make_job([f"model={model}", f"objective.name={objective}"]), Hardware())
    assert err.value.key == "objective.name"


@pytest.mark.parametrize("recipe", ["masked_lm", "span_corruption"])
def test_held_out_scores_agree_under_every_strategy(trained, recipe: str) -> None:
    """The held-out loss, perplexity and accuracy at step 20 (masked tokens, or the decoder's
    targets): better than the untrained model, and the same under DDP and ZeRO-3."""
    scores = {}
    for parallelism in ("ddp", "zero3"):
        rows = [m for m in read_metrics(trained(recipe, parallelism) / "metrics.jsonl")
                if "val/loss" in m]
        assert [r["step"] for r in rows] == [20]
        scores[parallelism] = rows[0]
    ddp, zero3 = scores["ddp"], scores["zero3"]
    assert ddp["val/perplexity"] == pytest.approx(math.exp(ddp["val/loss"]))
    assert ddp["val/loss"] < losses(trained(recipe, "ddp"))[0] - 0.5
    assert 0 < ddp["val/accuracy"] < 1
    for key in ("val/loss", "val/accuracy"):
        assert zero3[key] == pytest.approx(ddp[key], abs=1e-5)
