"""Slurm launcher: an sbatch script rendered from the plan (pure), preflight checks, submission,
status and cancel.

The script is the plan's dry-run artefact (`<run_dir>/job.sbatch`) and is submitted unchanged.
User-chosen values never reach a shell unquoted: `#SBATCH` values must match a plain charset,
every argv word in the body goes through `shlex.quote`, and the job name and log path are
passed to sbatch as argv, not through a shell.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from orchestrator.errors import ConfigError, LaunchError
from orchestrator.plan import Plan
from orchestrator.schema import JobConfig

SAFE = re.compile(r"^[A-Za-z0-9._:@,+=/%-]*$")
SCRIPT, RECORD = "job.sbatch", "slurm_job.json"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
            "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Shell variables the body defines itself; only these may appear unquoted in the srun line.
RUNTIME_VARS = ("${RDZV_HOST}", "${RDZV_PORT}", "${SLURM_JOB_ID}")


def _checked(key: str, value: str) -> str:
    if not SAFE.match(value):
        raise ConfigError(key, value, "letters, digits and ._:@,+=/%- only (it goes into an "
                                      "#SBATCH line)")
    return value


def job_name(run_dir: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", Path(run_dir).name)[:64] or "orchestrator"


def _word(arg: str) -> str:
    """Quote one argv word; our own runtime variables stay expandable inside double quotes."""
    if any(v in arg for v in RUNTIME_VARS):
        stripped = arg
        for v in RUNTIME_VARS:
            stripped = stripped.replace(v, "")
        if not SAFE.match(stripped):
            raise ValueError(f"unexpected characters around a runtime variable: {arg!r}")
        return f'"{arg}"'
    return shlex.quote(arg)


def render_script(plan: Plan, job: JobConfig) -> str:
    s = job.launcher.slurm
    directives = [f"--nodes={plan.nnodes}", "--ntasks-per-node=1",
                  f"--time={_checked('launcher.slurm.time', s.time)}",
                  f"--signal={_checked('launcher.slurm.signal', s.signal)}"]
    if plan.device == "cuda":
        directives.append(f"--gpus-per-node={plan.nproc_per_node}")
    for key in ("partition", "account", "qos", "mem", "constraint"):
        value = getattr(s, key)
        if value is not None:
            directives.append(f"--{key}={_checked(f'launcher.slurm.{key}', value)}")
    if s.cpus_per_task is not None:
        directives.append(f"--cpus-per-task={s.cpus_per_task}")
    if s.exclusive:
        directives.append("--exclusive")
    for i, extra in enumerate(s.extra_sbatch):
        if not extra.startswith("--"):
            raise ConfigError(f"launcher.slurm.extra_sbatch[{i}]", extra, "an option like "
                              "--reservation=NAME")
        directives.append(_checked(f"launcher.slurm.extra_sbatch[{i}]", extra))
    exports = [f"export {k}={shlex.quote(v)}" for k, v in sorted(plan.env.items())]
    (command,) = plan.commands  # one command, run on every node by srun
    lines = [
        "#!/bin/bash",
        "# Rendered by orchestrator from plan.json; submitted unchanged (see slurm_job.json).",
        *[f"#SBATCH {d}" for d in directives],
        "set -euo pipefail",
        *exports,
        '# Rendezvous on the first node of the allocation.',
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "RDZV_HOST=$(scontrol show node \"$head_node\""
        " | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')",
        "# A port per job, so jobs sharing a head node never collide.",
        f"RDZV_PORT=$(( {job.launcher.rdzv_port} + SLURM_JOB_ID % 1000 ))",
        'echo "orchestrator: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST,'
        ' rendezvous $RDZV_HOST:$RDZV_PORT"',
        f"srun --nodes={plan.nnodes} --ntasks-per-node=1 --kill-on-bad-exit=1 "
        + " ".join(_word(a) for a in command),
    ]
    return "\n".join(lines) + "\n"


def submit_argv(job: JobConfig, script: Path) -> list[str]:
    log = Path(job.run_dir) / "slurm-%j.out"
    return ["sbatch", "--parsable", f"--job-name={job_name(job.run_dir)}", f"--output={log}",
            str(script)]


def _run(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise LaunchError(f"{argv[0]} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


def preflight(job: JobConfig, plan: Plan) -> None:
    """Fail fast on what can be checked here instead of queueing a doomed job."""
    if shutil.which("sbatch") is None:
        raise ConfigError("launcher.name", "slurm", "a launcher whose tools are here: sbatch "
                          "is not on PATH (scripts/start_slurm.sh starts a local cluster)")
    rows = [line.split() for line in _run(["sinfo", "-h", "-o", "%P %D"]).splitlines() if line]
    sizes = {name.rstrip("*"): int(n) for name, n in rows}
    default = next((name.rstrip("*") for name, _ in rows if name.endswith("*")), None)
    partition = job.launcher.slurm.partition or default
    if partition not in sizes:
        raise ConfigError("launcher.slurm.partition", job.launcher.slurm.partition,
                          "one of " + ", ".join(sorted(sizes)))
    if plan.nnodes > sizes[partition]:
        raise ConfigError("cluster.nodes", plan.nnodes,
                          f"at most {sizes[partition]} (nodes in partition {partition})")
    run_dir = Path(job.run_dir)
    if not os.access(run_dir, os.W_OK):
        raise ConfigError("run_dir", str(run_dir), "a writable directory")


class SlurmHandle:
    def __init__(self, job_id: str, run_dir: Path, poll_s: float = 2.0) -> None:
        self.job_id, self.run_dir, self.poll_s = job_id, run_dir, poll_s

    def status(self) -> str:
        out = subprocess.run(["scontrol", "show", "job", "-o", self.job_id],
                             capture_output=True, text=True, timeout=60)
        found = re.search(r"JobState=(\S+)", out.stdout)
        return found.group(1) if found else "UNKNOWN"

    def wait(self) -> int:
        while (state := self.status()) not in TERMINAL:
            time.sleep(self.poll_s)
        return 0 if state == "COMPLETED" else 1

    def cancel(self, timeout_s: float = 120) -> str:
        _run(["scancel", self.job_id])
        deadline = time.monotonic() + timeout_s
        while (state := self.status()) not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.5)
        return state

    @staticmethod
    def load(run_dir: Path) -> SlurmHandle:
        record = run_dir / RECORD
        if not record.exists():
            raise ConfigError("run_dir", str(run_dir), f"a run directory holding {RECORD} "
                              "(one submitted with launcher=slurm)")
        return SlurmHandle(json.loads(record.read_text())["job_id"], run_dir)


def write_script(plan: Plan, job: JobConfig) -> Path:
    path = Path(job.run_dir) / SCRIPT
    path.write_text(render_script(plan, job))
    return path


def launch_slurm(plan: Plan, job: JobConfig) -> SlurmHandle:
    """Submit exactly the script `action=plan` wrote (rendered again only if it is missing)."""
    preflight(job, plan)
    script = Path(job.run_dir) / SCRIPT
    if not script.exists():
        write_script(plan, job)
    argv = submit_argv(job, script)
    job_id = _run(argv).strip().split(";")[0]
    record = {"job_id": job_id, "submit": argv, "script": str(script),
              "log": str(Path(job.run_dir) / f"slurm-{job_id}.out")}
    (Path(job.run_dir) / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    print(f"submitted Slurm job {job_id}; log: {record['log']}")
    return SlurmHandle(job_id, Path(job.run_dir), job.launcher.slurm.poll_s)
