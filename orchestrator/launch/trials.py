"""A search's trials in flight: started as ordinary runs (`python -m orchestrator` with the
trial's parameters), their metrics reported to the study as the files grow, pruned through the
stop signal, and told to the study when they end. A Slurm trial's job outlives a killed
controller: the next controller re-attaches it (`reattach`) instead of running it again.

The stop is the one a user sends with `kill -USR1`: on the local launcher to the trial's own
launcher, which passes it to the ranks; on Slurm to the job's steps (`scancel --signal=USR1`,
what the time-limit warning sends). Either way every rank stops after the same step with a
checkpoint. `SEARCH_TRIAL_JSON`, written first, makes the stop final: the sbatch script does
not requeue a pruned trial.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

from orchestrator.common.attempt import take_attempt
from orchestrator.common.contract import SEARCH_TRIAL_JSON, SLURM_RECORD, metrics_path
from orchestrator.common.errors import LaunchError
from orchestrator.common.files import write_atomic
from orchestrator.common.lifeline import die_with_parent
from orchestrator.config.schema import JobConfig
from orchestrator.launch.slurm_job import GONE_POLLS, TERMINAL, SlurmHandle, run_checked

TRIAL_DIR = "trial-{:04d}"
TRIAL_LOG = "trial-{:04d}.log"  # the trial's stdout and stderr, beside its run dir


class Process(Protocol):
    """What the controller needs of a trial's process (subprocess.Popen's subset)."""

    returncode: Optional[int]

    def poll(self) -> Optional[int]: ...
    def terminate(self) -> None: ...
    def wait(self) -> int: ...


class SlurmJob:
    """A Slurm trial's job that a restarted controller re-attached: polled like a process
    (exit code 0 when the job COMPLETED). Stopping the controller leaves it running."""

    def __init__(self, handle: SlurmHandle) -> None:
        self.handle, self.returncode = handle, None
        self._next, self._gone = 0.0, 0

    def poll(self) -> Optional[int]:
        if self.returncode is None and time.monotonic() >= self._next:
            state = self.handle.status()
            self._gone = self._gone + 1 if self.handle.gone else 0
            if state in TERMINAL or self._gone >= GONE_POLLS:
                # a job the cluster forgot (no accounting) still says how it ended
                ended = take_attempt(self.handle.run_dir) if state != "COMPLETED" else None
                finished = state == "COMPLETED" or (ended or {}).get("state") == "finished"
                self.returncode = 0 if finished else 1
            self._next = time.monotonic() + self.handle.poll_s
        return self.returncode

    def terminate(self) -> None:
        """The job goes on; the next controller re-attaches it."""

    def wait(self) -> int:
        return self.returncode if self.returncode is not None else 1


@dataclass
class Running:
    trial: Any  # optuna.Trial
    proc: Process
    run_dir: Path
    metrics: Path
    last_step: int = -1  # the last step whose value was reported to the study
    pruned_at: Optional[int] = None  # the step after which it was told to stop
    read_pos: tuple[int, int] = (0, 0)  # the metrics file's inode, bytes read so far
    cpus: Optional[frozenset[int]] = None  # the CPUs it runs on (cpu_slots), None: any
    final_step: int = 0  # its train.steps: a value logged there is never pruned (0: unknown)


def cpu_slots(job: JobConfig) -> list[frozenset[int]]:
    """Trials on this machine (launcher=local) with others in flight get CPUs of their own:
    this process's CPUs split into `search.parallel` sets, so that each trial's ranks plan
    their threads for their share (config/derived.py: usable_cpus) instead of all of them
    oversubscribing every core. None to split: Slurm trials, one in flight, too few CPUs."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    n = job.search.parallel
    if job.launcher.name != "local" or n < 2 or len(cpus) < n:
        return []
    return [frozenset(cpus[i * len(cpus) // n:(i + 1) * len(cpus) // n]) for i in range(n)]


def start(trial: Any, job: JobConfig, command: list[str],
          cpus: Optional[frozenset[int]] = None) -> Running:
    """Trial `trial` as a run of `command` (the shared overrides and the trial's own), in its
    run dir under the study dir, on `cpus` (None: this process's); its output in its log."""
    study_dir = Path(job.run_dir)
    run_dir = study_dir / TRIAL_DIR.format(trial.number)
    argv = [sys.executable, "-m", "orchestrator", *command, f"hydra.run.dir={run_dir}"]

    def prepare() -> None:  # in the child, before it runs the CLI
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        die_with_parent()

    with open(study_dir / TRIAL_LOG.format(trial.number), "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
                                start_new_session=True, preexec_fn=prepare)
    return Running(trial, proc, run_dir, metrics_path(run_dir, job.logging.metrics_file),
                   cpus=cpus, final_step=_final_step(trial.params, job))


def _final_step(params: dict[str, Any], job: JobConfig) -> int:
    return int(params.get("train.steps", job.train.steps))


def new_records(running: Running) -> list[dict[str, Any]]:
    """The metrics file's whole lines written since the last call (from the start again when a
    resumed attempt rewrote it, which gives it a new inode)."""
    try:
        with open(running.metrics, "rb") as f:
            inode, size = os.fstat(f.fileno()).st_ino, os.fstat(f.fileno()).st_size
            known, offset = running.read_pos
            if inode != known or size < offset:
                offset = 0
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return []
    whole = data[:data.rfind(b"\n") + 1]  # a record being written now is read next time
    running.read_pos = (inode, offset + len(whole))
    out = []
    for line in whole.decode(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a record cut off by a killed attempt
    return out


def report(running: Running, metric: str, signal_name: str = "SIGUSR1") -> None:
    """The trial's new values of `metric` reported to the study at their steps; when the pruner
    says so and it is still running, the trial is stopped (`stop`)."""
    if running.pruned_at is not None:
        return
    for record in new_records(running):
        if metric not in record or "event" in record or record["step"] <= running.last_step:
            continue
        running.trial.report(float(record[metric]), int(record["step"]))
        running.last_step = int(record["step"])
        last = running.final_step and running.last_step >= running.final_step
        if not last and running.proc.poll() is None and running.trial.should_prune():
            stop(running, running.last_step, signal_name)
            print(f"trial {running.trial.number} pruned at step {running.pruned_at}: "
                  f"{metric} = {record[metric]:.6g}")
            return


def stop(running: Running, step: int, signal_name: str = "SIGUSR1") -> None:
    """Prune: the marker first (so a Slurm job is not requeued), then the stop signal the
    trial's ranks listen for (`stop_signal`)."""
    running.pruned_at = step
    mark_pruned(running.run_dir, step)
    record = running.run_dir / SLURM_RECORD
    if record.is_file():  # a Slurm trial: its job's steps (the time-limit warning's path)
        job_id = json.loads(record.read_text())["job_id"]
        with contextlib.suppress(LaunchError):  # it ended meanwhile: nothing left to stop
            run_checked(["scancel", f"--signal={signal_name.removeprefix('SIG')}", job_id])
    elif running.proc.poll() is None and isinstance(running.proc, subprocess.Popen):
        running.proc.send_signal(getattr(signal, signal_name))


def mark_pruned(run_dir: Path, step: int, exit_code: Optional[int] = None) -> None:
    """`search_trial.json`: the trial in `run_dir` was pruned after `step` (and, once it has
    ended, with `exit_code`)."""
    record: dict[str, Any] = {"state": "PRUNED", "step": step}
    if exit_code is not None:
        record["exit_code"] = exit_code
    write_atomic(run_dir / SEARCH_TRIAL_JSON, json.dumps(record) + "\n")


def pruned(run_dir: Path) -> Optional[int]:
    """The step after which the search pruned the trial in `run_dir` (None: it did not)."""
    path = run_dir / SEARCH_TRIAL_JSON
    return json.loads(path.read_text())["step"] if path.is_file() else None


def reattach(trial: Any, frozen: Any, job: JobConfig) -> Optional[Running]:
    """A RUNNING trial of an earlier controller whose Slurm job was submitted, followed again
    (its job may have ended meanwhile: then it is told at the next poll); None when it had no
    job (a local trial dies with its controller)."""
    run_dir = Path(job.run_dir) / TRIAL_DIR.format(frozen.number)
    if not (run_dir / SLURM_RECORD).is_file():
        return None
    handle = SlurmHandle.load(run_dir)
    handle.poll_s = job.launcher.slurm.poll_s
    steps = list(frozen.intermediate_values)
    return Running(trial, SlurmJob(handle), run_dir,
                   metrics_path(run_dir, job.logging.metrics_file),
                   last_step=max(steps, default=-1), pruned_at=pruned(run_dir),
                   final_step=_final_step(frozen.params, job))
