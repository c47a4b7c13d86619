"""Hydra entry point: compose → typed config → validate → plan → launch.

`action=validate` only checks; `action=plan` writes config.yaml + plan.json and prints the plan;
`action=run` (default) also launches and waits. User errors print one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from orchestrator.common.errors import ConfigError, OrchestratorError
from orchestrator.common.secrets import redact_override
from orchestrator.config.derived import Hardware
from orchestrator.config.load import to_job
from orchestrator.config.schema import JobConfig
from orchestrator.launch import rundir
from orchestrator.planning.preflight import validate
from orchestrator.quantization.checks import one_process_layout

ConfigStore.instance().store(name="orchestrator_schema", node=JobConfig)
# `${launch_id:}` in configs/config.yaml: the default run dir is the time plus this, so two
# launches in the same second never share one
_LAUNCH_ID = uuid.uuid4().hex[:6]
OmegaConf.register_new_resolver("launch_id", lambda: _LAUNCH_ID, replace=True)
_task_started = False
_failed_points: list[int] = []  # exit codes of the failed points of a sweep (-m)


def compose_job(cfg: DictConfig, run_dir: str) -> JobConfig:
    """The typed job; run_dir is Hydra's output dir, except for status/cancel, which name an
    earlier run's directory themselves."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:  # e.g. an interpolation to a key that does not exist
        key = str(getattr(e, "full_key", None) or "?")
        raw: Any = OmegaConf.to_container(cfg, resolve=False)
        for part in key.split("."):
            raw = raw.get(part) if isinstance(raw, dict) else None
        raise ConfigError(key, raw, f"a value that resolves ({_one_line(str(e))})") from None
    assert isinstance(data, dict)
    on_earlier_run = data.get("action") in ("status", "cancel", "export", "report")
    if data.get("run_dir") and not on_earlier_run:
        raise ConfigError("run_dir", data["run_dir"], "unset for action="
                          f"{data.get('action')} (a run goes to hydra.run.dir); run_dir names "
                          "an earlier run for action=status|cancel|export|report")
    if on_earlier_run and data.get("run_dir"):
        run_dir = str(data["run_dir"])
    return to_job(data, run_dir=run_dir)


def execute(job: JobConfig, hw: Hardware | None = None,
            overrides: list[str] | None = None) -> int:
    """Run `job`'s action: validate, plan and (for action=run) launch; or one of the actions
    on an earlier run (status, cancel, export, report). Raises OrchestratorError on bad input."""
    if job.action in ("status", "cancel"):
        from orchestrator.launch.slurm_job import status_or_cancel

        return status_or_cancel(job)
    if job.action == "export":
        from orchestrator.run.checkpoint.export import export

        print(f"exported to {export(job)}")
        return 0
    if job.action == "report":  # charts + report.md of a run or sweep dir, in <dir>/report/
        from orchestrator.reports.report import report

        for path in report(job.run_dir):
            print(f"wrote {path}")
        return 0
    hw = hw or Hardware.detect()
    job, note = one_process_layout(job, {o.split("=", 1)[0].lstrip("+~")
                                         for o in overrides or []})
    if note:
        print(note)
    if job.action == "search":  # trials as runs: each validated and launched as one
        return _search(job, hw, [*_config_dirs(), *(overrides or [])])
    validate(job, hw)
    if job.action == "prepare":
        from orchestrator.data import prepare_data

        for out, built in prepare_data(job):
            print(f"{'prepared' if built else 'up to date, nothing to do'}: {out}")
        return 0
    if job.action == "validate":
        print(f"config OK: {job.world_size} ranks, zero_stage {job.parallelism.zero_stage}, "
              f"{job.precision.name}")
        return 0
    from orchestrator.launch.job import plan_and_launch

    return plan_and_launch(job, hw, overrides)


def _config_dirs() -> list[str]:
    """The command line's `--config-dir`, which each trial (composed again by its own CLI) and
    best.yaml's rerun command need as well."""
    if not HydraConfig.initialized():
        return []
    return [arg for source in HydraConfig.get().runtime.config_sources
            if source.provider == "command-line" and source.schema == "file"
            for arg in ("--config-dir", source.path)]


def _search(job: JobConfig, hw: Hardware, overrides: list[str]) -> int:
    """The study, its summary after each trial; 0 when a trial completed, 1 when none did."""
    from orchestrator.launch.search import TRIAL_DIR, search
    from orchestrator.reports.search import SUMMARY_MD, draw_study, write_summary

    study_dir, metric = Path(job.run_dir), job.search.metric
    study = search(job, hw, overrides, lambda study, shared: write_summary(
        study, study_dir, TRIAL_DIR, metric, shared, job.search.storage))
    print(f"plots: {draw_study(study, study_dir)[-1]}")
    if not [t for t in study.get_trials(deepcopy=False) if t.value is not None]:
        print(f"error: no trial completed; see {study_dir / SUMMARY_MD}", file=sys.stderr)
        return 1
    best = study.best_trial
    print(f"best: trial {best.number}, {metric} = {best.value:.6g} "
          f"({', '.join(f'{k}={v}' for k, v in best.params.items())}); {study_dir / SUMMARY_MD}")
    return 0


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> Any:
    global _task_started
    _task_started = True
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    overrides = list(hc.overrides.task)
    error = None
    try:
        job = compose_job(cfg, hc.runtime.output_dir)
        if multirun and job.logging.wandb.group is None:
            job = _in_sweep_group(job, Path(hc.sweep.dir).name)
        code = execute(job, overrides=overrides)
    except OrchestratorError as e:
        print(f"error: {e}", file=sys.stderr)
        code, error = getattr(e, "exit_code", 2), str(e)
    finally:
        # validate, status, cancel and refused launches write nothing: no empty run dir,
        # and none a killed launch left beside it either
        rundir.discard_if_unused(hc.runtime.output_dir)
        rundir.remove_abandoned(Path(hc.runtime.output_dir).parent)
    if code and multirun:  # a failed point is a row of the summary; the sweep goes on
        from orchestrator.reports.sweep import record_failed_point

        record_failed_point(Path(hc.runtime.output_dir), overrides, code,
                            error or f"exit code {code}")
        _failed_points.append(code)
        return
    if code:
        sys.exit(code)  # success returns, so a sweep goes on to its next point


def _in_sweep_group(job: JobConfig, sweep: str) -> JobConfig:
    """Every point of a sweep logs into one W&B group named after the sweep."""
    wandb_cfg = dataclasses.replace(job.logging.wandb, group=sweep,
                                    name=job.logging.wandb.name or f"{sweep}-"
                                    f"{Path(job.run_dir).name}")
    return dataclasses.replace(job, logging=dataclasses.replace(job.logging, wandb=wandb_cfg))


def _refuse_reused_sweep_dir(argv: list[str], given: dict[str, str]) -> None:
    """Before Hydra writes multirun.yaml into it: a `hydra.sweep.dir` that exists and holds
    anything is refused, unless it holds an earlier sweep of ours and `run.overwrite=true`."""
    if not ({"-m", "--multirun"} & set(argv)) or "hydra.sweep.dir" not in given:
        return
    path = Path(given["hydra.sweep.dir"])
    if not path.is_dir() or not any(path.iterdir()):
        return
    ours = (path / "multirun.yaml").is_file()
    if ours and given.get("run.overwrite", "").lower() == "true":
        return
    raise ConfigError("hydra.sweep.dir", str(path), "a new or empty directory" + (
        ", or run.overwrite=true to replace the earlier sweep in it" if ours else
        " (this one holds files that are not a sweep of ours)") + "; nothing was written")


def hydra_error_line(error: BaseException) -> str:
    """One line for an error Hydra raised while composing the config or making its output
    directory (a bad override, an unknown group option, a YAML syntax error, a path that
    cannot be created), with secret-looking override values hidden."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(error, MissingConfigException) and error.options:
        first = str(error).splitlines()[0].removeprefix("In 'config': ")
        group = (error.missing_cfg_file or "").rpartition("/")[0] or "the group"
        return f"{first}; available options in '{group}': {', '.join(error.options)}"
    if isinstance(error, OSError) and error.filename:
        return (f"cannot create the run directory (hydra.run.dir): {error.strerror}: "
                f"{error.filename}")
    mark = getattr(error, "problem_mark", None)  # a YAML syntax error: where it is
    if isinstance(error, yaml.MarkedYAMLError) and mark is not None:
        return (f"YAML syntax error in {mark.name}, line {mark.line + 1}, column "
                f"{mark.column + 1}: {error.context or ''} {error.problem or ''}".strip())
    parts = [error] + ([error.__cause__] if error.__cause__ else [])
    line = ": ".join(_one_line(str(p)) for p in parts if str(p).strip())
    if isinstance(error, OverrideParseException):
        line = f"override {redact_override(error.override)!r}: {line}"
    return line or type(error).__name__


def _one_line(text: str) -> str:
    """A multi-line library message as one line: its own lines, without OmegaConf's indented
    `full_key: ...` detail lines; secret-looking `key=value` words hidden."""
    lines = text.splitlines()
    kept = " ".join([lines[0].strip()] + [x.strip() for x in lines[1:] if not x.startswith(" ")])
    return re.sub(r"[+~]*[\w.\-]+=\S+", lambda m: redact_override(m.group(0)), kept).strip()


def run() -> None:
    """`python -m orchestrator`: Hydra's own errors (they happen before `main` runs) are user
    errors too: one line, exit 2. Once `main` has started, a bug keeps its traceback."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its own report
    given = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in sys.argv[1:] if "=" in a}
    rundir.note_missing([given.get("hydra.run.dir", "runs"),
                         given.get("hydra.sweep.dir", "multirun")])
    try:
        _refuse_reused_sweep_dir(sys.argv[1:], given)
        main()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if _task_started:
            raise
        print(f"error: {hydra_error_line(e)}", file=sys.stderr)
        sys.exit(2)
    if _failed_points:  # the sweep ran every point; say that some failed
        sys.exit(_failed_points[0])
