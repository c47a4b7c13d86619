"""A search's space and keys before anything launches: the Hydra Optuna sweeper's syntax read
into Optuna's distributions as that sweeper maps them, and every bad spec one line (exit 2)."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.common.errors import ConfigError
from orchestrator.config.search import Param, check_search
from tests.conftest import REPO, make_job, run_cli

BASE = ["action=search", "eval.every_steps=5", "eval.holdout=0.1"]


def _space(overrides: list[str]) -> list[Param]:
    job = make_job([*BASE, *overrides])
    return check_search(job, dataclasses.asdict(job))


def test_the_sweepers_syntax_becomes_optunas_distributions() -> None:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    from orchestrator.launch.search import distributions

    space = _space(["+search.params.optim.lr='tag(log, interval(1e-5, 1e-2))'",
                    "+search.params.train.micro_batch_size='choice(4, 8)'",
                    "+search.params.train.grad_accum_steps='range(1, 4)'",
                    "+search.params.optim.warmup_steps='tag(int, interval(0, 10))'",
                    "+search.params.optim.weight_decay='interval(0, 0.1)'"])
    got = distributions(space)
    assert got == {"optim.lr": FloatDistribution(1e-5, 1e-2, log=True),
                   "train.micro_batch_size": CategoricalDistribution([4, 8]),
                   "train.grad_accum_steps": CategoricalDistribution([1, 2, 3]),
                   "optim.warmup_steps": IntDistribution(0, 10),
                   "optim.weight_decay": FloatDistribution(0.0, 0.1)}


def test_a_command_line_entry_replaces_the_yamls() -> None:
    space = _space(["search=example", "+search.params.optim.lr='interval(0.1, 0.2)'"])
    assert [(p.key, p.low, p.high, p.log) for p in space if p.key == "optim.lr"] == [
        ("optim.lr", 0.1, 0.2, False)]


def test_the_shipped_example_is_a_valid_search() -> None:
    keys = [p.key for p in _space(["search=example"])]
    assert keys == ["optim.lr", "train.micro_batch_size"]
    assert (REPO / "configs" / "search" / "example.yaml").is_file()


BAD = {
    "unknown key": (["+search.params.optim.learning_rate='interval(0.1, 0.2)'"],
                    "config key 'search.params.optim.learning_rate' has value '?'; allowed: a "
                    "key of the job's config (e.g. optim.lr, train.micro_batch_size); see "
                    "`action=plan` for every key"),
    "range on a word": (["+search.params.optim.name='interval(0, 1)'"],
                        "config key 'search.params.optim.name' has value 'interval(0, 1)'; "
                        "allowed: choice(...) for optim.name (its value 'adamw' is not a "
                        "number, so it has no range)"),
    "low >= high": (["+search.params.optim.lr='interval(0.1, 0.01)'"],
                    "config key 'search.params.optim.lr' has value 'interval(0.1, 0.01)'; "
                    "allowed: an interval with low < high (got 0.1 >= 0.01)"),
    "log of zero": (["+search.params.optim.lr='tag(log, interval(0, 0.1))'"],
                    "config key 'search.params.optim.lr' has value 'tag(log, interval(0, "
                    "0.1))'; allowed: bounds > 0 on a log scale"),
    "not a sweep": (["+search.params.optim.lr=0.1"],
                    "config key 'search.params.optim.lr' has value 0.1; allowed: a sweep: "
                    "choice(...), range(...) or [tag(log|int, ...)] interval(low, high); a "
                    "fixed value belongs on the command line"),
    "no space": ([], "config key 'search.params' has value {}; allowed: at least one key to "
                 "search"),
    "metric nothing logs": (["search=example", "eval.every_steps=0"],
                            "config key 'search.metric' has value 'val/loss'; allowed: a "
                            "metric the trials log: set eval.every_steps"),
    "unknown metric": (["search=example", "search.metric=val/bleu"],
                       "config key 'search.metric' has value 'val/bleu'; allowed: a metric the "
                       "trials log: loss, lr, tokens_per_s, step_time_s, val/loss, "
                       "val/perplexity, val/accuracy"),
    "grid over an interval": (["search=example", "search.sampler=grid"],
                              "config key 'search.sampler' has value 'grid'; allowed: tpe, "
                              "random or cmaes with an interval (optim.lr)"),
    "a trial that would not wait": (
        ["search=example", "launcher=slurm"],
        "config key 'launcher.name' has value 'slurm'; allowed: local, or slurm with "
        "launcher.slurm.wait=true, for action=search"),
    "no trials": (["search=example", "search.trials=0"],
                  "config key 'search.trials' has value 0; allowed: a number > 0"),
}


@pytest.mark.parametrize("case", BAD)
def test_each_bad_search_is_one_line(case: str) -> None:
    overrides, want = BAD[case]
    with pytest.raises(ConfigError) as err:
        _space(overrides)
    line = str(err.value)
    assert "\n" not in line and line.startswith(want), line


def test_a_bad_search_exits_2_with_its_line_and_launches_nothing(tmp_path) -> None:
    """Through the CLI, an unknown sampler too (the schema's choices)."""
    for overrides, want in [
        (["search=example", "search.sampler=bayes"],
         "error: config key 'search.sampler' has value 'bayes'; allowed: one of 'tpe', "
         "'random', 'grid', 'cmaes'"),
        (["search=example", "+search.params.optim.lr='interval(1, 0)'"],
         "error: config key 'search.params.optim.lr' has value 'interval(1, 0)'; allowed: an "
         "interval with low < high (got 1 >= 0)"),
    ]:
        proc = run_cli([*BASE, *overrides], tmp_path / "study")
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(want) and proc.stderr.count("\n") == 1, proc.stderr
        assert not (tmp_path / "study").exists()
