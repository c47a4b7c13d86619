"""`action=search`: an Optuna study whose trials are ordinary runs (ask/tell; Optuna samples,
we orchestrate). `search.parallel` trials are kept in flight: when one ends the next starts, no
batches. Each trial is `python -m orchestrator` with the search's own overrides and the
trial's parameters, in its own run dir under the study dir (`trial-NNNN`), so it is planned,
validated and launched like any run. The study lives in Optuna's JournalStorage file in the
study dir (a plain file on the run filesystem: no database server).

A trial's value is the last `search.metric` its metrics file logged; a trial that failed or
logged none is told FAIL with its exit code. The summary (`search_summary.md/.json`) and the
best trial's config (`best.yaml`) follow each finished trial, so a stopped study still has them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.common.errors import ConfigError
from orchestrator.common.files import write_atomic
from orchestrator.common.plan import Plan
from orchestrator.common.records import read_metrics
from orchestrator.config.derived import Hardware, resolve_device, usable_cpus
from orchestrator.config.launcher import stop_signal
from orchestrator.config.schema import JobConfig
from orchestrator.config.search import Param, check_search
from orchestrator.launch import rundir
from orchestrator.launch.local import Interrupted
from orchestrator.launch.trials import (
    TRIAL_DIR,
    TRIAL_LOG,
    Running,
    cpu_slots,
    mark_pruned,
    reattach,
    report,
    start,
)
from orchestrator.planning.layouts import (
    Layout,
    enumerate_layouts,
    layout_params,
    layout_plan,
    override,
)
from orchestrator.planning.plan import make_plan
from orchestrator.planning.preflight import validate
from orchestrator.planning.study import check_budget, plan_lines, study_plan, study_trials

STUDY_FILE = "study.journal"  # Optuna's JournalStorage, in the study dir
SEARCH_PLAN = "search_plan.json"  # the study's plan (planning/study.py), before any trial
RETRY_OF = "retry_of"  # a trial's user attribute: the abandoned trial it runs again
POLL_S = 0.05  # how often the controller looks at its trials (a poll reads only new bytes)
LAYOUT = "layout"  # a layout search trial's user attribute: its layout, in words
SEARCH_KEYS = ("action", "search", "hydra.run.dir", "hydra.sweep.dir")  # not passed to trials


def trial_overrides(overrides: list[str]) -> list[str]:
    """The command line's overrides every trial shares: all but the search's own."""
    out = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key in SEARCH_KEYS or key.startswith("search."):
            continue
        out.append(o)
    return out


def distributions(space: list[Param]) -> dict[str, Any]:
    """Optuna's distribution of each dimension, as the Hydra Optuna sweeper maps them."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, Any] = {}
    for p in space:
        if p.choices:
            out[p.key] = CategoricalDistribution(list(p.choices))
        elif p.integer:
            out[p.key] = IntDistribution(int(p.low), int(p.high), log=p.log)
        else:
            out[p.key] = FloatDistribution(p.low, p.high, log=p.log)
    return out


def sampler(name: str, space: list[Param], seed: int) -> Any:
    """Optuna's sampler `name`; grid runs every combination of the (categorical) space."""
    import optuna

    if name == "grid":
        return _grid({p.key: list(p.choices) for p in space}, seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _grid(space: dict[str, list[Any]], seed: int) -> Any:
    """Optuna's grid sampler, asked and told: its `after_trial` stops an `optimize` loop once
    every point ran (Study.stop, which raises outside one); our loop ends by counting."""
    import optuna

    class Grid(optuna.samplers.GridSampler):
        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            return None

    return Grid(space, seed=seed)


def pruner(name: str, warmup_trials: int) -> Any:
    """Optuna's pruner `name` (none: never prunes)."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=warmup_trials)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def study_storage(study_dir: Path, url: str | None) -> Any:
    """Optuna's storage of a study: the JournalStorage file in the study dir, or the database
    at `url` (RDBStorage); a database that cannot be opened is a ConfigError."""
    import optuna
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend
    from sqlalchemy.exc import SQLAlchemyError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if url is None:
        return JournalStorage(JournalFileBackend(str(study_dir / STUDY_FILE)))
    try:
        return RDBStorage(url)
    except (SQLAlchemyError, ImportError) as e:
        raise ConfigError("search.storage", url, "a database this machine can open "
                          f"({str(e).strip().splitlines()[0]})") from None


def study_name(job: JobConfig) -> str:
    return job.search.study or Path(job.run_dir).name


def open_study(job: JobConfig, space: list[Param]) -> Any:
    """The study in its storage (created, or continued when it exists)."""
    import optuna

    s = job.search
    return optuna.create_study(study_name=study_name(job), direction=s.direction,
                               storage=study_storage(Path(job.run_dir), s.storage),
                               load_if_exists=True,
                               sampler=sampler(s.sampler, space, job.train.seed),
                               pruner=pruner(s.pruner, s.warmup_trials))


def _start(trial: Any, job: JobConfig, shared: list[str], running: list[Running]) -> Running:
    """Trial `trial` started, on a CPU share no other running trial holds (cpu_slots)."""
    params = [override(key, value) for key, value in trial.params.items()]
    held = {r.cpus for r in running}
    cpus = next((c for c in cpu_slots(job) if c not in held), None)
    started = start(trial, job, [*shared, *params, *_wandb(job, trial.number)], cpus)
    what = trial.user_attrs.get(LAYOUT) or " ".join(params)
    print(f"trial {trial.number} started: {what} -> {started.run_dir}")
    return started


def _wandb(job: JobConfig, number: int) -> list[str]:
    """Every trial logs into one W&B group named after the study (unless the command line
    names a group), as `<study>-trial-NNNN`."""
    w = job.logging.wandb
    if w.mode == "disabled" or w.group is not None:
        return []
    study = job.search.study or Path(job.run_dir).name
    return [f"logging.wandb.group={study}",
            f"logging.wandb.name={study}-{TRIAL_DIR.format(number)}"]


def final_metric(path: Path, metric: str) -> float | None:
    """The last value of `metric` in a trial's metrics file (None: it logged none)."""
    if not path.is_file():
        return None
    values = [r[metric] for r in read_metrics(path) if metric in r]
    return float(values[-1]) if values else None


def throughput(path: Path) -> float | None:
    """A layout's measured tokens/s: the median over its steps after the first (which holds
    the warm-up); None when it logged none."""
    if not path.is_file():
        return None
    records = [r for r in read_metrics(path) if "tokens_per_s" in r]
    steady = [r["tokens_per_s"] for r in records if r["step"] > 1] or \
        [r["tokens_per_s"] for r in records]
    return float(statistics.median(steady)) if steady else None


def trial_value(job: JobConfig) -> Callable[[Path], float | None]:
    """How a trial's metrics file gives its value."""
    if job.search.objective == "throughput":
        return throughput
    return lambda path: final_metric(path, job.search.metric)


def _finish(study: Any, running: Running, code: int, job: JobConfig) -> None:
    import optuna

    metric = job.search.metric
    number = running.trial.number
    if running.pruned_at is not None:
        study.tell(number, state=optuna.trial.TrialState.PRUNED)
        mark_pruned(running.run_dir, running.pruned_at, code)
        return
    value = trial_value(job)(running.metrics) if code == 0 else None
    if value is None:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
        why = f"exit code {code}" if code else f"no {metric} logged"
        log = running.run_dir.parent / TRIAL_LOG.format(number)
        print(f"trial {number} failed ({why}; see {log})")
        return
    study.tell(number, value)
    print(f"trial {number} finished: {metric} = {value:.6g}")


def search(job: JobConfig, hw: Hardware, overrides: list[str],
           on_trial: Callable[[Any, list[str]], None]) -> Any:
    """`action=search`: check the base job and the search before anything launches, then run
    the study (`on_trial(study, shared overrides)` after each finished trial); return it."""
    validate(job, hw)  # what every trial's own launch checks again, with its parameters
    space = check_search(job, dataclasses.asdict(job))
    plan, layouts = _plan(job, space, hw)
    check_budget(plan)
    print("\n".join(plan_lines(plan)))
    Path(job.run_dir).mkdir(parents=True, exist_ok=True)
    held = rundir.lock(Path(job.run_dir))  # one controller per study dir
    try:
        write_atomic(Path(job.run_dir) / SEARCH_PLAN, json.dumps(plan, indent=2) + "\n")
        return run_search(job, space, layouts, overrides, on_trial)
    except KeyboardInterrupt:  # the running trials were stopped; the same command continues
        raise Interrupted(signal.SIGINT) from None
    finally:
        os.close(held)


def _plan(job: JobConfig, space: list[Param], hw: Hardware
          ) -> tuple[dict[str, Any], list[Layout]]:
    """The study's plan and, for the layout search, the layouts that run (their overrides)."""
    device, cpus = resolve_device(job, hw), usable_cpus()

    def planner(point: JobConfig) -> Plan:
        return make_plan(point, device, cpus)

    if job.search.objective == "metric":
        return study_plan(job, space, planner), []
    fitting, refused = enumerate_layouts(job, space, device, planner)
    plan = layout_plan(job, fitting, refused)
    return plan, fitting[:plan["trials"]]


def categorical(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Optuna's distributions over exactly these points (each a value of every key)."""
    from optuna.distributions import CategoricalDistribution

    return {key: CategoricalDistribution(sorted({p[key] for p in points}, key=repr))
            for key in points[0]}


def finished_trials(study: Any) -> int:
    """Trials that ran to an end: completed, pruned or failed, except abandoned ones that
    were queued again (their retry counts instead)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}
    ended = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(1 for t in trials if t.state in ended and t.number not in retried)


def _recover(study: Any, job: JobConfig) -> list[Running]:
    """Trials a stopped controller left RUNNING: a Slurm trial's job is re-attached (it ran on,
    or ended meanwhile); any other trial died with its controller (lifeline), so it is failed
    and queued to run again once with the same parameters."""
    import optuna
    from optuna.trial import TrialState

    attached = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # Optuna has no public way to a live Trial of a stored one: its id is the storage's
        running = reattach(optuna.trial.Trial(study, t._trial_id), t, job)
        if running is not None:
            print(f"trial {t.number} re-attached: its Slurm job ({running.run_dir})")
            attached.append(running)
            continue
        study.tell(t.number, state=TrialState.FAIL)
        print(f"trial {t.number} was left running by a stopped search: failed", end="")
        if RETRY_OF in t.user_attrs:
            print(" (a retry already)")
            continue
        study.enqueue_trial(t.params, user_attrs={**t.user_attrs, RETRY_OF: t.number})
        print(", queued again")
    return attached


def run_search(job: JobConfig, space: list[Param], layouts: list[Layout],
               overrides: list[str], on_trial: Callable[[Any, list[str]], None]) -> Any:
    """Run the study to `search.trials` finished trials (the layout search: one per layout,
    queued in order), `search.parallel` at a time; return it. Trials already finished in the
    study's storage count."""
    study = open_study(job, space)
    running = _recover(study, job)
    shared, total = trial_overrides(overrides), study_trials(job, space)
    dists = distributions(space)
    if layouts:
        points = layout_params(job, [layout.overrides for layout in layouts])
        dists, total = categorical(points), len(points)
        stored = {t.user_attrs.get(LAYOUT) for t in study.get_trials(deepcopy=False)}
        if not stored:  # a new study: its layouts, in order
            for point, layout in zip(points, layouts, strict=True):
                study.enqueue_trial(point, user_attrs={LAYOUT: layout.label})
        elif stored != {layout.label for layout in layouts}:
            raise ConfigError("hydra.run.dir", job.run_dir, "a new study dir for a changed "
                              "layout search (this study's layouts: "
                              f"{', '.join(sorted(str(x) for x in stored))})")
    finished = finished_trials(study)
    try:
        while finished + len(running) < total or running:
            ended = [r for r in running if r.proc.poll() is not None]
            for r in ended:  # told first, so that the sampler knows them for the next ask
                running.remove(r)
                report(r, job.search.metric, stop_signal(job))  # its last values, to plot
                _finish(study, r, r.proc.returncode, job)
                finished += 1
            while len(running) < job.search.parallel and finished + len(running) < total:
                running.append(_start(study.ask(dists), job, shared, running))
            if ended:  # the summary once the freed slots are busy again
                on_trial(study, shared)
            for r in running:
                report(r, job.search.metric, stop_signal(job))
            time.sleep(POLL_S)
    finally:
        for r in running:  # interrupted: stop what is still running
            r.proc.terminate()
            r.proc.wait()
    return study
