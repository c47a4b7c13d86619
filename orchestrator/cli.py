"""Hydra entry point: compose → typed config → validate → plan → launch.

`action=validate` only checks; `action=plan` writes config.yaml + plan.json and prints the plan;
`action=run` (default) also launches and waits. User errors print one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from orchestrator.errors import LaunchError, OrchestratorError
from orchestrator.redact import redact, redact_override
from orchestrator.schema import JobConfig
from orchestrator.typed import to_dict, to_job
from orchestrator.validate import Hardware, resolve_device, validate

ConfigStore.instance().store(name="orchestrator_schema", node=JobConfig)


def compose_job(cfg: DictConfig, run_dir: str) -> JobConfig:
    """The typed job; run_dir is Hydra's output dir, except for status/cancel, which name an
    earlier run's directory themselves."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    if data.get("action") in ("status", "cancel") and data.get("run_dir"):
        run_dir = str(data["run_dir"])
    return to_job(data, run_dir=run_dir)


def write_config(job: JobConfig, path: Path) -> None:
    """The resolved config with secrets redacted; ranks read it back."""
    path.write_text(yaml.safe_dump(redact(to_dict(job)), sort_keys=False))


def execute(job: JobConfig, hw: Hardware | None = None,
            overrides: list[str] | None = None) -> int:
    """Validate, plan and (for action=run) launch `job`. Raises OrchestratorError on bad input."""
    from orchestrator import fit
    from orchestrator.plan import Plan, make_plan
    from orchestrator.report import print_plan

    if job.action in ("status", "cancel"):
        return _status_or_cancel(job)
    hw = hw or Hardware.detect()
    validate(job, hw)
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
    plan = dataclasses.replace(planner(job), auto_reason=reason)
    if job.action == "run":
        fit.refuse_if_too_big(job, plan, planner)
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(job, run_dir / "config.yaml")
    lines = [redact_override(o) for o in overrides or []]
    (run_dir / "overrides.txt").write_text("".join(f"{line}\n" for line in lines))
    plan.write(run_dir / "plan.json")
    if plan.deepspeed_config is not None:
        from orchestrator.strategies.deepspeed import CONFIG_FILE

        (run_dir / CONFIG_FILE).write_text(json.dumps(plan.deepspeed_config, indent=2) + "\n")
    print_plan(plan)
    _write_launch_artefacts(job, plan)
    if job.action == "plan":
        print(f"plan written to {run_dir / 'plan.json'} (nothing launched)")
        return 0
    from orchestrator.data import prepare_tokenizer
    from orchestrator.launchers import launch

    prepare_tokenizer(job)
    handle = launch(plan, job)
    if job.launcher.name == "slurm" and not job.launcher.slurm.wait:
        print(f"state: {handle.status()}; follow with: python -m orchestrator action=status "
              f"run_dir={run_dir}")
        return 0
    code = handle.wait()
    if code != 0:
        raise LaunchError(f"training failed with exit code {code} (the failing rank's error is "
                          f"printed above); run dir: {run_dir}")
    metrics = run_dir / job.logging.metrics_file
    print(f"done. run dir: {run_dir}" + (f"; metrics: {metrics}" if metrics.exists() else ""))
    wandb_info = run_dir / "wandb_run.json"
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
        sys.exit(2)
    if code:
        sys.exit(code)  # success returns, so a sweep goes on to its next point
