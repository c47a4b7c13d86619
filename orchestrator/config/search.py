"""A search's space (`search.params`), in the Hydra Optuna sweeper's syntax so that its configs
carry over: each entry is an override key and a sweep, read by Hydra's own override grammar.

    optim.lr: tag(log, interval(1e-5, 1e-2))    # a float on a log scale
    train.micro_batch_size: choice(4, 8)         # one of these values
    train.grad_accum_steps: range(1, 5)          # 1, 2, 3 or 4
    optim.warmup_steps: tag(int, interval(0, 50))  # an integer in [0, 50]

As the sweeper maps them: `choice` and `range` are categorical, `interval` a float (an integer
with the `int` tag), on a log scale with the `log` tag. Checked before anything launches, one
line each: a key the job does not have, a range on a key that is not a number, low >= high, a
non-positive bound on a log scale, a value that is not a sweep.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from orchestrator.common.errors import ConfigError
from orchestrator.common.secrets import is_secret_key

KEY = "search.params"


@dataclasses.dataclass(frozen=True)
class Param:
    """One dimension of the space: `choices` (categorical), or [low, high] (`integer`, `log`)."""

    key: str
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    integer: bool = False
    log: bool = False


def parse_space(params: Mapping[str, Any], job: Mapping[str, Any]) -> list[Param]:
    """`search.params` as Params, checked against the job's own values (`job`: the composed
    config as a plain nested dict)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    out = []
    for key, spec in dict(_flat(params)).items():  # a later entry (the command line's) wins
        current = _lookup(job, key)
        try:
            sweep = parser.parse_overrides([f"{key}={spec}"])[0].value()
        except HydraException as e:
            raise ConfigError(f"{KEY}.{key}", spec, "a sweep: choice(...), range(...) or "
                              f"[tag(log|int, ...)] interval(low, high) ({_first_line(e)})"
                              ) from None
        if isinstance(sweep, (ChoiceSweep, RangeSweep)):
            values = (tuple(sweep.list) if isinstance(sweep, ChoiceSweep)
                      else tuple(range(sweep.start, sweep.stop, sweep.step or 1)))
            if not values:
                raise ConfigError(f"{KEY}.{key}", spec, "at least one value")
            out.append(Param(key, choices=values))
        elif isinstance(sweep, IntervalSweep):
            out.append(_interval(key, spec, sweep, current))
        else:
            raise ConfigError(f"{KEY}.{key}", spec, "a sweep: choice(...), range(...) or "
                              "[tag(log|int, ...)] interval(low, high); a fixed value belongs "
                              "on the command line")
    return out


def _flat(params: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """`{optim: {lr: ...}}` (a command-line override `search.params.optim.lr=...`) and
    `{optim.lr: ...}` (a YAML key) alike, as dotted keys."""
    out: list[tuple[str, Any]] = []
    for key, value in params.items():
        if isinstance(value, Mapping):
            out += _flat(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _interval(key: str, spec: Any, sweep: Any, current: Any) -> Param:
    if isinstance(current, bool) or not isinstance(current, (int, float)) and current is not None:
        raise ConfigError(f"{KEY}.{key}", spec, f"choice(...) for {key} (its value "
                          f"{current!r} is not a number, so it has no range)")
    low, high, tags = float(sweep.start), float(sweep.end), set(sweep.tags)
    unknown = tags - {"log", "int"}
    if unknown:
        raise ConfigError(f"{KEY}.{key}", spec, f"tags log and int only (not {sorted(unknown)})")
    if low >= high:
        raise ConfigError(f"{KEY}.{key}", spec, f"an interval with low < high (got {low:g} "
                          f">= {high:g})")
    if "log" in tags and low <= 0:
        raise ConfigError(f"{KEY}.{key}", spec, "bounds > 0 on a log scale")
    integer = "int" in tags or isinstance(current, int)
    return Param(key, low=low, high=high, integer=integer, log="log" in tags)


def _lookup(job: Mapping[str, Any], key: str) -> Any:
    """The job's value at dotted `key`; refused if the job has no such key."""
    node: Any = job
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"{KEY}.{key}", "?", "a key of the job's config (e.g. optim.lr, "
                              "train.micro_batch_size); see `action=plan` for every key")
        node = node[part]
    if isinstance(node, Mapping):
        raise ConfigError(f"{KEY}.{key}", "?", f"a single value's key ({key} is a whole "
                          "section; name one of its keys)")
    return node


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# what a trial's metrics file logs (run/metrics.py, run/evaluation.py): every logged step, and
# with eval.every_steps the held-out values
STEP_METRICS = ("loss", "lr", "tokens_per_s", "step_time_s")
EVAL_METRICS = ("val/loss", "val/perplexity", "val/accuracy")


def check_search(job: Any, tree: Mapping[str, Any]) -> list[Param]:
    """The search's keys and space, before anything launches (`tree`: the job as a nested
    dict); the space's Params."""
    s = job.search
    if not s.params and s.objective == "metric":
        raise ConfigError(KEY, {}, "at least one key to search, e.g. search=example or "
                          "+search.params.optim.lr='tag(log, interval(1e-4, 1e-2))'; or "
                          "search=layout for the layout search")
    for key in ("trials", "parallel"):
        if getattr(s, key) < 1:
            raise ConfigError(f"search.{key}", getattr(s, key), "a number > 0")
    space = parse_space(s.params, tree)
    launcher = job.launcher
    if launcher.name not in ("local", "slurm") or (launcher.name == "slurm"
                                                   and not launcher.slurm.wait):
        raise ConfigError("launcher.name", launcher.name, "local, or slurm with "
                          "launcher.slurm.wait=true, for action=search (a trial's value is "
                          "read from its metrics when its run has ended)")
    evaluates = job.eval.every_steps > 0 or any(p.key == "eval.every_steps" for p in space)
    if s.metric not in STEP_METRICS + EVAL_METRICS:
        raise ConfigError("search.metric", s.metric, "a metric the trials log: "
                          f"{', '.join(STEP_METRICS + EVAL_METRICS)}")
    if s.metric in EVAL_METRICS and not evaluates:
        raise ConfigError("search.metric", s.metric, "a metric the trials log: set "
                          "eval.every_steps (held-out metrics are logged at evaluations), or "
                          "search.metric=loss")
    if s.storage is not None:
        _check_storage(s.storage)
        if s.study is None:  # a database holds many studies: the dir's name may be taken
            raise ConfigError("search.study", None, "a name for the study with search.storage "
                              "(a database holds many studies; this one's name is not taken "
                              "from its dir)")
    if s.budget_gpu_hours is not None and s.budget_gpu_hours <= 0:
        raise ConfigError("search.budget_gpu_hours", s.budget_gpu_hours, "a number > 0")
    if s.warmup_trials < 0:
        raise ConfigError("search.warmup_trials", s.warmup_trials, "a number >= 0")
    if s.objective == "throughput":
        _check_throughput(job, space)
    elif s.layouts or s.device_memory_mb is not None:
        key = "search.layouts" if s.layouts else "search.device_memory_mb"
        raise ConfigError(key, list(s.layouts) or s.device_memory_mb, "unset unless "
                          "search.objective=throughput (the layout search: search=layout)")
    if s.sampler == "grid" and any(not p.choices for p in space):
        bad = next(p.key for p in space if not p.choices)
        raise ConfigError("search.sampler", "grid", f"tpe, random or cmaes with an interval "
                          f"({bad}): a grid runs every value of choice(...) and range(...)")
    return space


def _check_throughput(job: Any, space: list[Param]) -> None:
    """The layout search's value is each layout's measured tokens/s, maximised; its layouts run
    to their last step and, on one machine, one at a time."""
    s = job.search
    for key, want in (("metric", "tokens_per_s"), ("direction", "maximize"), ("pruner", "none")):
        if getattr(s, key) != want:
            raise ConfigError(f"search.{key}", getattr(s, key), f"{want} for search.objective="
                              "throughput (each layout is judged by its measured tokens/s; "
                              "search=layout sets this)")
    interval = next((p.key for p in space if not p.choices), None)
    if interval is not None:
        raise ConfigError(f"{KEY}.{interval}", s.params.get(interval, "?"), "choice(...) or "
                          "range(...) for search.objective=throughput (each layout runs at "
                          "every value)")
    if s.parallel > 1 and job.launcher.name == "local":
        raise ConfigError("search.parallel", s.parallel, "1 for search.objective=throughput "
                          "with launcher=local (layouts measured side by side on one machine "
                          "slow each other down)")
    if s.device_memory_mb is not None and s.device_memory_mb <= 0:
        raise ConfigError("search.device_memory_mb", s.device_memory_mb, "a number > 0")


def _check_storage(url: str) -> None:
    """`search.storage`: a database URL SQLAlchemy reads, without a password (a URL is written
    into the study dir's summary and printed; the database's client config holds secrets)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:  # shown up to its scheme: the rest may hold a secret
        raise ConfigError("search.storage", url.split(":", 1)[0] + ":...", "a database URL for "
                          "Optuna's RDBStorage, e.g. sqlite:///runs/study.db, or unset for the "
                          "journal file in the study dir") from None
    if parsed.password is not None or any(is_secret_key(k) for k in parsed.query):
        query = "&".join(f"{k}={'***' if is_secret_key(k) else v}"
                         for k, v in parsed.query.items())
        shown = parsed.set(query={}).render_as_string(hide_password=True)
        raise ConfigError("search.storage", shown + (f"?{query}" if query else ""),
                          "a URL without a password: give it to the database's client "
                          "config instead (e.g. ~/.pgpass or PGPASSWORD for PostgreSQL)")
