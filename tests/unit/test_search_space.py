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
    "a storage URL with a password": (
        ["search=example", "search.storage='postgresql://me:hunter2@db/optuna'"],
        "config key 'search.storage' has value 'postgresql://me:***@db/optuna'; allowed: a URL "
        "without a password"),
    "a layout key without the layout search": (
        ["search=example", "search.layouts=[ddp]"],
        "config key 'search.layouts' has value ['ddp']; allowed: unset unless "
        "search.objective=throughput"),
    "a secret in the storage URL's query": (
        ["search=example", "search.storage='postgresql://me@db/optuna?password=hunter2'"],
        "config key 'search.storage' has value 'postgresql://me@db/optuna?password=***'; "
        "allowed: a URL without a password"),
    "a database without a study name": (
        ["search=example", "search.storage='sqlite:///s.db'"],
        "config key 'search.study' has value None; allowed: a name for the study with "
        "search.storage"),
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
    assert "hunter2" not in line


def test_a_bad_search_exits_2_with_its_line_and_launches_nothing(tmp_path) -> None:
    """Through the CLI, an unknown sampler too (the schema's choices)."""
    for overrides, want in [
        (["search=example", "search.sampler=bayes"],
         "error: config key 'search.sampler' has value 'bayes'; allowed: one of 'tpe', "
         "'random', 'grid', 'cmaes'"),
        (["search=example", "model=gpt2_tiny", "cluster.gpu=h100",
          "search.budget_gpu_hours=1e-9"],
         "error: config key 'search.budget_gpu_hours' has value 1e-09; allowed: at least "),
        (["search=example", "+search.params.optim.lr='interval(1, 0)'"],
         "error: config key 'search.params.optim.lr' has value 'interval(1, 0)'; allowed: an "
         "interval with low < high (got 1 >= 0)"),
    ]:
        proc = run_cli([*BASE, *overrides], tmp_path / "study")
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(want) and proc.stderr.count("\n") == 1, proc.stderr
        assert not (tmp_path / "study").exists()


def test_the_corners_of_the_space() -> None:
    from orchestrator.planning.study import MAX_CORNERS, corners

    space = [Param("optim.lr", low=1e-4, high=1e-2, log=True),
             Param("train.micro_batch_size", choices=(2, 4, 8)),
             Param("optim.warmup_steps", low=0, high=10, integer=True)]
    got = corners(space)
    assert len(got) == 2 * 3 * 2 and {"optim.lr": 1e-2, "train.micro_batch_size": 8,
                                       "optim.warmup_steps": 10} in got
    many = [Param(f"k{i}", choices=(1, 2, 3)) for i in range(6)]  # 729 > MAX_CORNERS
    assert MAX_CORNERS < 3 ** 6 and len(corners(many)) == 1 + 6 * 2


def _study_plan(overrides: list[str]) -> dict:
    from orchestrator.planning.plan import make_plan
    from orchestrator.planning.study import study_plan

    job = make_job([*BASE, "search=example", "model=gpt2_tiny", "cluster.gpus_per_node=1",
                    "cluster.gpu=h100", "train.steps=1000", *overrides])
    return study_plan(job, check_search(job, dataclasses.asdict(job)),
                      lambda point: make_plan(point, "cuda", 2))


def test_the_study_plan_bounds_the_costliest_trial() -> None:
    """Micro batch 4 against 2 (one accumulation step): twice the tokens a step, so twice the
    GPU-hours at the same FLOPs per token; the study's bound is the trials times the costlier,
    and its wall time with 2 in flight is 4 such trials one after another."""
    plan = _study_plan(["cluster.gpu_hour_usd=2.0"])
    low, high = plan["trial_min"], plan["trial_max"]
    assert low["params"]["train.micro_batch_size"] == 2
    assert high["params"]["train.micro_batch_size"] == 4
    assert high["gpu_hours"] == pytest.approx(2 * low["gpu_hours"], rel=1e-12)
    assert plan["gpu_hours"] == pytest.approx(8 * high["gpu_hours"], rel=1e-12)
    assert plan["cost_usd"] == pytest.approx(2.0 * plan["gpu_hours"], rel=1e-12)
    assert plan["wall_time_s"] == pytest.approx(4 * high["wall_time_s"], rel=1e-12)
    assert high["gpu_hours"] == pytest.approx(high["wall_time_s"] / 3600, rel=1e-12)  # 1 GPU


def test_a_study_over_its_budget_is_refused() -> None:
    from orchestrator.planning.study import check_budget

    plan = _study_plan([])
    check_budget({**plan, "budget_gpu_hours": plan["gpu_hours"] * 1.01})
    with pytest.raises(ConfigError) as err:
        check_budget({**plan, "budget_gpu_hours": plan["gpu_hours"] * 0.99})
    assert str(err.value).startswith(
        f"config key 'search.budget_gpu_hours' has value {plan['gpu_hours'] * 0.99!r}; "
        f"allowed: at least {plan['gpu_hours']:.3g} (the study's plan: 8 trials x up to "
        f"{plan['trial_max']['gpu_hours']:.3g} GPU-h each, at optim.lr=")
    without_gpu = {**plan, "gpu_hours": None, "budget_gpu_hours": 1.0}
    with pytest.raises(ConfigError, match="set cluster.gpu"):
        check_budget(without_gpu)


def test_a_grid_runs_each_point_once() -> None:
    from orchestrator.planning.study import study_trials

    grid = ["+search.params.train.micro_batch_size='choice(2, 4)'",
            "+search.params.optim.lr='choice(1e-3, 1e-2, 1e-1)'", "search.sampler=grid"]
    for trials, want in ((8, 6), (4, 4)):
        job = make_job([*BASE, *grid, f"search.trials={trials}"])
        assert study_trials(job, check_search(job, dataclasses.asdict(job))) == want
