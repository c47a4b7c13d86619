"""A job from its checked config to its end: planned (with `parallelism.auto`'s choice), checked
against the cluster and the checkpoint it resumes, its run directory written (config.yaml,
overrides.txt, plan.json, deepspeed.json, the sbatch script or manifest), then, for `action=run`,
its data made ready, launched, waited for and reported. `action=plan` stops after the files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import signal

from orchestrator.common.attempt import take_attempt
from orchestrator.common.contract import (
    CONFIG_SHA_ENV,
    CONFIG_YAML,
    DEEPSPEED_JSON,
    OVERRIDES_TXT,
    PLAN_JSON,
    WANDB_RUN_JSON,
    metrics_path,
)
from orchestrator.common.errors import LaunchError
from orchestrator.common.plan import Plan
from orchestrator.common.secrets import redact_override
from orchestrator.config.derived import Hardware, resolve_device, usable_cpus
from orchestrator.config.load import config_text
from orchestrator.config.resume import check_compatible, to_resume
from orchestrator.config.schema import JobConfig
from orchestrator.data import prepare_data, prepare_tokenizer
from orchestrator.launch import rundir
from orchestrator.launch.k8s import write_manifest
from orchestrator.launch.launcher import launch
from orchestrator.launch.slurm import preflight as slurm_preflight
from orchestrator.launch.slurm import write_script
from orchestrator.launch.trainjob import write_trainjob
from orchestrator.planning import fit
from orchestrator.planning.plan import make_plan
from orchestrator.planning.preflight import validate
from orchestrator.planning.table import print_plan


def plan_and_launch(job: JobConfig, hw: Hardware, overrides: list[str] | None = None) -> int:
    """`action=plan` and `action=run` of a validated job; the exit code (0: done, or planned;
    128 + the signal's number: stopped by the stop signal, checkpoint saved)."""
    device, cpus = resolve_device(job, hw), usable_cpus()

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
                slurm_preflight(job, plan)
    with rundir.held(job) as run_dir:
        _write_run_files(job, plan, text, run_dir, overrides)
        if job.action == "plan":
            print(f"plan written to {run_dir.path / PLAN_JSON} (nothing launched)")
            return 0
        return _launch_and_wait(job, plan, run_dir)


def _check_resume(job: JobConfig) -> None:
    """The checkpoint this launch will continue from (if any) must fit its config."""
    if job.train.task != "pretrain" or job.run.overwrite:
        return
    resume = to_resume(job)
    if resume is not None:
        changed = check_compatible(job, resume)
        print(f"resuming from {resume.path} (step {resume.step})" + (
            "; changed since: " + ", ".join(f"{k} {before!r} -> {now!r}"
                                             for k, (before, now) in changed.items())
            if changed else ""))


def _write_run_files(job: JobConfig, plan: Plan, text: str, run_dir: rundir.RunDir,
                     overrides: list[str] | None) -> None:
    """The run directory's files (secrets redacted), the plan table, and the dry-run files of
    cluster launchers: what `action=run` submits is exactly these."""
    run_dir.write(CONFIG_YAML, text)
    lines = [redact_override(o) for o in overrides or []]
    run_dir.write(OVERRIDES_TXT, "".join(f"{line}\n" for line in lines))
    plan.write(run_dir.path / PLAN_JSON)
    if plan.deepspeed_config is not None:
        run_dir.write(DEEPSPEED_JSON, plan.deepspeed_json())
    print_plan(plan)
    if job.launcher.name == "slurm":
        path = write_script(plan, job)
        print(f"sbatch script ({path}):\n{path.read_text()}")
    elif job.launcher.name == "k8s" and job.launcher.k8s.api == "trainjob":
        print(f"TrainJob manifest: {write_trainjob(plan, job)}")
    elif job.launcher.name == "k8s":
        print(f"PyTorchJob manifest: {write_manifest(plan, job)}")


def _launch_and_wait(job: JobConfig, plan: Plan, run_dir: rundir.RunDir) -> int:
    prepare_tokenizer(job)
    if job.data.name != "synthetic" and job.train.task != "generate":
        prepare_data(job)  # tokenized here once, not by every rank
    run_dir.launched()
    handle = launch(plan, job)
    if job.launcher.name == "slurm" and not job.launcher.slurm.wait:
        print(f"state: {handle.status()}; follow with: python -m orchestrator action=status "
              f"run_dir={run_dir.path}")
        return 0
    code = handle.wait()
    # a Slurm job's last attempt: those its script requeued removed their records
    ended = take_attempt(run_dir.path)
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
    metrics = metrics_path(run_dir.path, job.logging.metrics_file)
    print(f"done. run dir: {run_dir.path}" + (f"; metrics: {metrics}" if metrics.exists()
                                              else ""))
    wandb_info = run_dir.path / WANDB_RUN_JSON
    if wandb_info.exists():
        print(f"W&B run ({job.logging.wandb.mode}): {wandb_info.read_text().strip()}")
    return 0
