"""The three model families train 2 ranks on the shipped corpus under DDP and ZeRO-3, with
their own objectives, and their model state matches the plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.common.errors import ConfigError
from orchestrator.config.derived import Hardware
from orchestrator.planning.preflight import validate
from tests.conftest import make_job, run_ok
from tests.distributed.checks import assert_memory_matches_plan, losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The family's 20-step pre-training run, once per (recipe, parallelism) for this module:
    the training test checks it, the evaluate test starts from its model."""
    done: dict[tuple[str, str], Path] = {}

    def run(recipe: str, parallelism: str) -> Path:
        if (recipe, parallelism) not in done:
            out = tmp_path_factory.mktemp(f"{recipe}-{parallelism}")
            run_ok([f"+recipe={recipe}", f"parallelism={parallelism}", "logging=none"],
                           out)
            done[recipe, parallelism] = out
        return done[recipe, parallelism]

    return run


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


@pytest.mark.parametrize(("recipe", "model", "objective"),
                         [("masked_lm", "bert_tiny", "mlm"),
                          ("span_corruption", "t5_tiny", "span")])
def test_evaluate_scores_the_held_out_split_alike_under_every_strategy(
        tmp_path, trained, recipe: str, model: str, objective: str) -> None:
    import json
    import math

    pre = trained(recipe, "ddp")
    results = []
    for parallelism in ("ddp", "zero3"):
        run_ok(["+recipe=evaluate", f"model={model}", f"parallelism={parallelism}",
                      f"model.pretrained_path={pre / 'model'}"],
                     tmp_path / parallelism)
        results.append(json.loads((tmp_path / parallelism / "eval.json").read_text()))
    ddp, zero3 = results
    assert ddp["objective"] == objective and ddp["tokens"] == zero3["tokens"] > 0
    assert ddp["perplexity"] == pytest.approx(math.exp(ddp["loss"]))
    assert ddp["loss"] < losses(pre)[0]  # better than the untrained model
    assert 0 < ddp["accuracy"] < 1  # masked (or target) tokens predicted right
    for key in ("loss", "accuracy"):
        assert zero3[key] == pytest.approx(ddp[key], abs=1e-5)
