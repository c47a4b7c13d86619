"""Hydra entry point: compose → typed config → validate → plan → launch.

`action=validate` only checks; `action=plan` writes config.yaml + plan.json and prints the plan;
`action=run` (default) also launches and waits. User errors print one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
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

from orchestrator import rundir
from orchestrator.errors import ConfigError, LaunchError, OrchestratorError
from orchestrator.redact import redact, redact_override
from orchestrator.schema import JobConfig
from orchestrator.typed import CONFIG_SHA_ENV, to_dict, to_job
from orchestrator.validate import Hardware, resolve_device, validate

ConfigStore.instance().store(name="orchestrator_schema", node=JobConfig)
# `${launch_id:}` in configs/config.yaml: the default run dir is the time plus this, so two
# launches in the same second never share one
_LAUNCH_ID = uuid.uuid4().hex[:6]
OmegaConf.register_new_resolver("launch_id", lambda: _LAUNCH_ID, replace=True)
_task_started = False


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
    if data.get("action") in ("status", "cancel", "export", "report") and data.get("run_dir"):
        run_dir = str(data["run_dir"])
    return to_job(data, run_dir=run_dir)


def config_text(job: JobConfig) -> str:
    """The resolved config with secrets redacted, as config.yaml holds it; ranks read it back."""
    return yaml.safe_dump(redact(to_dict(job)), sort_keys=False)


def write_config(job: JobConfig, path: Path) -> None:
    rundir.write_atomic(path, config_text(job))


def execute(job: JobConfig, hw: Hardware | None = None,
            overrides: list[str] | None = None) -> int:
    """Validate, plan and (for action=run) launch `job`. Raises OrchestratorError on bad input."""
    from orchestrator import fit
    from orchestrator.plan import Plan, make_plan

    if job.action in ("status", "cancel"):
        return _status_or_cancel(job)
    if job.action == "export":
        from orchestrator.checkpoint.export import export

        print(f"exported to {export(job)}")
        return 0
    if job.action == "report":  # charts + report.md of a run or sweep dir, in <dir>/report/
        from orchestrator.plots import report

        for path in report(job.run_dir):
            print(f"wrote {path}")
        return 0
    hw = hw or Hardware.detect()
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
    device, cpus = resolve_device(job, hw), os.cpu_count() or 1

    def planner(candidate: JobConfig) -> Plan:
        return make_plan(candidate, device, cpus)

    reason = None
    if job.parallelism.auto:
        job, reason = fit.choose(job, planner)
        validate(job, hw)
    # the job as the ranks run it: a plan's files are exactly what `action=run` writes (the
    # sbatch script carries this text's hash)
    text = config_text(dataclasses.replace(job, action="run"))
    plan = planner(job)
    plan = dataclasses.replace(plan, auto_reason=reason, env={
        **plan.env, CONFIG_SHA_ENV: hashlib.sha256(text.encode()).hexdigest()})
    if job.action == "run":
        fit.refuse_if_too_big(job, plan, planner)
        _check_resume(job)
        if job.launcher.name == "slurm":  # the cluster's checks, before anything is written
            from orchestrator.launchers.slurm import preflight

            preflight(job, plan)
    with rundir.held(job) as run_dir:
        return _plan_and_launch(job, plan, text, run_dir, overrides)


def _check_resume(job: JobConfig) -> None:
    """The checkpoint this launch will continue from (if any) must fit its config."""
    if job.train.task != "pretrain" or job.run.overwrite:
        return
    from orchestrator.checkpoint.resume import check_compatible, to_resume

    resume = to_resume(job)
    if resume is not None:
        changed = check_compatible(job, resume)
        print(f"resuming from {resume.path} (step {resume.step})" + (
            "; changed since: " + ", ".join(f"{k} {before!r} -> {now!r}"
                                             for k, (before, now) in changed.items())
            if changed else ""))


def _plan_and_launch(job: JobConfig, plan: Any, text: str, run_dir: rundir.RunDir,
                     overrides: list[str] | None) -> int:
    from orchestrator.report import print_plan

    run_dir.write("config.yaml", text)
    lines = [redact_override(o) for o in overrides or []]
    run_dir.write("overrides.txt", "".join(f"{line}\n" for line in lines))
    plan.write(run_dir.path / "plan.json")
    if plan.deepspeed_config is not None:
        from orchestrator.deepspeed_config import CONFIG_FILE

        run_dir.write(CONFIG_FILE, plan.deepspeed_json())
    print_plan(plan)
    _write_launch_artefacts(job, plan)
    if job.action == "plan":
        print(f"plan written to {run_dir.path / 'plan.json'} (nothing launched)")
        return 0
    from orchestrator.checkpoint.stop import take as take_attempt
    from orchestrator.data import prepare_tokenizer
    from orchestrator.launchers import launch

    prepare_tokenizer(job)
    if job.data.name != "synthetic" and job.train.task != "generate":
        from orchestrator.data import prepare_data

        prepare_data(job)  # tokenized here once, not by every rank
    run_dir.launched()
    handle = launch(plan, job)
    if job.launcher.name == "slurm" and not job.launcher.slurm.wait:
        print(f"state: {handle.status()}; follow with: python -m orchestrator action=status "
              f"run_dir={run_dir.path}")
        return 0
    code = handle.wait()
    ended = take_attempt(run_dir.path) if job.launcher.name != "slurm" else None
    if ended is not None and ended["state"] == "stopped":
        print(f"stopped by {ended['signal']} after step {ended['step']}; checkpoint: "
              f"{ended['checkpoint']}; to resume, run the same command with "
              f"hydra.run.dir={run_dir.path}")
        return 128 + int(getattr(signal, ended["signal"]))
    if ended is not None and ended["state"] == "finished":
        code = 0  # every step ran: a stop signal after the last made torchrun exit non-zero
    if code != 0:
        raise LaunchError(f"training failed with exit code {code} (the failing rank's error is "
                          f"printed above); run dir: {run_dir.path}")
    metrics = run_dir.path / job.logging.metrics_file
    print(f"done. run dir: {run_dir.path}" + (f"; metrics: {metrics}" if metrics.exists()
                                              else ""))
    wandb_info = run_dir.path / "wandb_run.json"
    if wandb_info.exists():
        print(f"W&B run ({job.logging.wandb.mode}): {wandb_info.read_text().strip()}")
    return 0


def _write_launch_artefacts(job: JobConfig, plan: Any) -> None:
    """The dry-run files of cluster launchers: what `action=run` submits is exactly these."""
    if job.launcher.name == "slurm":
        from orchestrator.launchers.slurm import write_script

        path = write_script(plan, job)
        print(f"sbatch script ({path}):\n{path.read_text()}")
    elif job.launcher.name == "k8s":
        from orchestrator.launchers.k8s import write_manifest

        print(f"PyTorchJob manifest: {write_manifest(plan, job)}")


def _status_or_cancel(job: JobConfig) -> int:
    from orchestrator.launchers.slurm import SlurmHandle

    handle = SlurmHandle.load(Path(job.run_dir))
    if job.action == "cancel":
        state = handle.cancel()
        print(f"Slurm job {handle.job_id}: {state}")
        return 0 if state == "CANCELLED" else 1
    record = json.loads((Path(job.run_dir) / "slurm_job.json").read_text())
    print(f"Slurm job {handle.job_id}: {handle.status()}; log: {record['log']}")
    return 0


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> Any:
    global _task_started
    _task_started = True
    hc = HydraConfig.get()
    try:
        job = compose_job(cfg, hc.runtime.output_dir)
        if hc.mode == RunMode.MULTIRUN and job.logging.wandb.group is None:
            # every point of a sweep logs into one W&B group named after the sweep
            sweep = Path(hc.sweep.dir).name
            wandb_cfg = dataclasses.replace(
                job.logging.wandb, group=sweep,
                name=job.logging.wandb.name or f"{sweep}-{Path(job.run_dir).name}")
            job = dataclasses.replace(job, logging=dataclasses.replace(job.logging,
                                                                       wandb=wandb_cfg))
        code = execute(job, overrides=list(hc.overrides.task))
    except OrchestratorError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    finally:
        # validate, status, cancel and refused launches write nothing: no empty run dir
        rundir.discard_if_unused(hc.runtime.output_dir)
    if code:
        sys.exit(code)  # success returns, so a sweep goes on to its next point


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
        main()
    except Exception as e:
        if _task_started:
            raise
        print(f"error: {hydra_error_line(e)}", file=sys.stderr)
        sys.exit(2)
