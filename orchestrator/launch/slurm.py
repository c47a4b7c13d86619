"""Slurm launcher: an sbatch script rendered from the plan (pure), preflight checks and
submission (the submitted job's state, wait and cancel: slurm_job.py).

The script is the plan's dry-run artefact (`<run_dir>/job.sbatch`) and is submitted unchanged.
Each node runs one srun task (torchrun → its ranks) that is given the node's CPUs explicitly
(see `_cpu_lines`); the rendezvous host is the first node's Slurm hostname.

User-chosen values never reach a shell unquoted: `#SBATCH` values must match a plain charset,
every argv word in the body goes through `shlex.quote`, and the job name and log path are
passed to sbatch as argv, not through a shell.

Secrets never enter the script: sbatch exports its own environment to the job (its default,
--export=ALL), so they are put there (`secrets.secret_env`) and reach the ranks through srun and
torchrun.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from orchestrator.common.contract import (
    ATTEMPT_JSON,
    SBATCH_SCRIPT,
    SEARCH_TRIAL_JSON,
    SLURM_RECORD,
)
from orchestrator.common.errors import ConfigError, LaunchError
from orchestrator.common.plan import Plan
from orchestrator.common.secrets import is_secret_key, secret_env
from orchestrator.config.schema import JobConfig
from orchestrator.launch.slurm_job import SlurmHandle, run_checked

SAFE = re.compile(r"^[A-Za-z0-9._:@,+=/%-]*$")
SCRIPT, RECORD = SBATCH_SCRIPT, SLURM_RECORD
# Shell variables the body defines itself; only these may appear unquoted in the srun line.
RUNTIME_VARS = ("${RDZV_HOST}", "${RDZV_PORT}", "${SLURM_JOB_ID}", "${NODE_CPUS}")


@dataclass(frozen=True)
class SlurmNode:
    """One node of one partition, as `sinfo -N` reports it."""

    name: str
    partition: str
    default: bool  # the cluster's default partition
    cpus: int
    gpus: int  # count of the `gpu` gres


def gres_gpus(gres: str) -> int:
    """GPUs in a node's Gres (sinfo %G): 'gpu:h100:8(S:0-1),shard:8' -> 8; '(null)' -> 0."""
    total = 0
    for item in gres.split(","):
        parts = re.sub(r"\(.*?\)", "", item).strip().split(":")
        if parts[0] != "gpu":
            continue
        total += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return total


def cluster_nodes(timeout_s: float = 60) -> list[SlurmNode]:
    """Every (node, partition) row of the cluster the Slurm tools here talk to."""
    out = run_checked(["sinfo", "-h", "-N", "-o", "%P|%c|%G|%N"], timeout_s)
    nodes = []
    for line in out.splitlines():
        if line.count("|") != 3:
            continue
        part, cpus, gres, name = line.split("|")
        nodes.append(SlurmNode(name, part.rstrip("*"), part.endswith("*"),
                               int(re.sub(r"\D", "", cpus) or 0), gres_gpus(gres)))
    return nodes


def partition_nodes(job: JobConfig, nodes: list[SlurmNode]) -> tuple[str, list[SlurmNode]]:
    """The job's partition (launcher.slurm.partition, else the default) and its nodes."""
    names = sorted({n.partition for n in nodes})
    default = next((n.partition for n in nodes if n.default), None)
    partition = job.launcher.slurm.partition or default
    if partition not in names:
        raise ConfigError("launcher.slurm.partition", job.launcher.slurm.partition,
                          "one of " + ", ".join(names))
    return partition, [n for n in nodes if n.partition == partition]


def usable_nodes(plan: Plan, nodes: list[SlurmNode]) -> list[SlurmNode]:
    """The nodes that can host one of the plan's nodes: enough GPUs when it runs on cuda."""
    return [n for n in nodes if plan.device != "cuda" or n.gpus >= plan.nproc_per_node]


def node_cpus(job: JobConfig, plan: Plan) -> Optional[int]:
    """CPUs of the smallest usable node of the job's partition, asked of Slurm (sinfo) when its
    tools are here; None when they are not, or the partition is unknown or has no usable node
    (the script then asks for whole nodes, see `render_script`)."""
    if shutil.which("sinfo") is None:
        return None
    try:
        _, nodes = partition_nodes(job, cluster_nodes(timeout_s=15))  # a plan does not wait
    except (ConfigError, LaunchError, OSError, ValueError, subprocess.TimeoutExpired):
        return None
    cpus = [n.cpus for n in usable_nodes(plan, nodes) if n.cpus > 0]
    return min(cpus) if cpus else None


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


def _cpu_lines(plan: Plan, job: JobConfig, cpus: Optional[int]) -> tuple[list[str], list[str],
                                                                          str]:
    """(#SBATCH directives, body lines, srun's --cpus-per-task) for the CPUs of each node.

    Every node runs one task (srun → torchrun → nproc_per_node ranks) that gets all the CPUs
    requested for it: launcher.slurm.cpus_per_task, else all CPUs of a node of the partition
    (`node_cpus`, asked of sinfo when rendering). Without that count, whole nodes are asked for
    (--exclusive) and the count is read from the allocation at run time. srun is given the count
    explicitly: since Slurm 22.05 it no longer inherits sbatch's --cpus-per-task.
    """
    s = job.launcher.slurm
    if s.cpus_per_task is not None:
        if s.cpus_per_task < 1:
            raise ConfigError("launcher.slurm.cpus_per_task", s.cpus_per_task,
                              "a positive CPU count, or null (all CPUs of a node)")
        cpus = s.cpus_per_task
    share = f"# The node's {plan.nproc_per_node} rank(s) share its CPUs."
    if cpus is not None:
        threads = max(1, cpus // plan.nproc_per_node)
        return ([f"--cpus-per-task={cpus}"], [share, f"export OMP_NUM_THREADS={threads}"],
                f"--cpus-per-task={cpus}")
    n = plan.nproc_per_node
    return (["--exclusive"] if not s.exclusive else [],
            ["# Whole nodes (the partition's CPU count was unknown when rendering): use the",
             "# allocation's CPUs, those of its smallest node ('64(x2)' or '64,32' -> 64 / 32).",
             "NODE_CPUS=$(tr ',' '\\n' <<<\"$SLURM_JOB_CPUS_PER_NODE\" | sed 's/(.*//'"
             " | sort -n | head -n 1)",
             share,
             f"export OMP_NUM_THREADS=$(( NODE_CPUS / {n} > 1 ? NODE_CPUS / {n} : 1 ))"],
            "--cpus-per-task=${NODE_CPUS}")


def render_script(plan: Plan, job: JobConfig, cpus: Optional[int] = None) -> str:
    """The sbatch script for `plan`. `cpus`: CPUs of a node of the partition (see `node_cpus`);
    None = unknown here (launcher.slurm.cpus_per_task, when set, wins either way)."""
    s = job.launcher.slurm
    directives = [f"--nodes={plan.nnodes}", "--ntasks-per-node=1",
                  f"--time={_checked('launcher.slurm.time', s.time)}"]
    if s.signal is not None:
        directives.append(f"--signal={_checked('launcher.slurm.signal', s.signal)}")
    if s.requeue:  # a requeued job appends to its log, which keeps every attempt's lines
        directives += ["--requeue", "--open-mode=append"]
    if plan.device == "cuda":
        directives.append(f"--gpus-per-node={plan.nproc_per_node}")
    for key in ("partition", "account", "qos", "mem", "constraint"):
        value = getattr(s, key)
        if value is not None:
            directives.append(f"--{key}={_checked(f'launcher.slurm.{key}', value)}")
    cpu_directives, cpu_body, srun_cpus = _cpu_lines(plan, job, cpus)
    directives += cpu_directives
    if s.exclusive:
        directives.append("--exclusive")
    for i, extra in enumerate(s.extra_sbatch):
        if not extra.startswith("--"):
            raise ConfigError(f"launcher.slurm.extra_sbatch[{i}]", extra, "an option like "
                              "--reservation=NAME")
        directives.append(_checked(f"launcher.slurm.extra_sbatch[{i}]", extra))
    # OMP_NUM_THREADS comes from the CPUs Slurm allocates, not from the planning machine.
    # Secret-named variables travel in sbatch's environment instead (`submit_env`).
    exports = [f"export {k}={shlex.quote(v)}" for k, v in sorted(plan.env.items())
               if k != "OMP_NUM_THREADS" and not is_secret_key(k)]
    (command,) = plan.commands  # one command, run on every node by srun
    srun = ["srun", f"--nodes={plan.nnodes}", "--ntasks-per-node=1", srun_cpus,
            "--kill-on-bad-exit=1", *command]
    lines = [
        "#!/bin/bash",
        "# Rendered by orchestrator from plan.json; submitted unchanged (see slurm_job.json).",
        *[f"#SBATCH {d}" for d in directives],
        "set -euo pipefail",
        *exports,
        *cpu_body,
        "# Rendezvous on the allocation's first node, named as Slurm lists it (its hostname, not",
        "# its NodeAddr): torchrun's c10d hosts the store on the node whose own hostname or",
        "# addresses match, and a NodeAddr on a second NIC (or a hostname mapped to 127.0.1.1)",
        "# matches none, so no node would host it and every node would time out joining.",
        'RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "# A port per job, so jobs sharing a head node never collide.",
        f"RDZV_PORT=$(( {job.launcher.rdzv_port} + SLURM_JOB_ID % 1000 ))",
        'echo "orchestrator: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST,'
        ' rendezvous $RDZV_HOST:$RDZV_PORT"',
        " ".join(_word(a) for a in srun) + " && status=0 || status=$?",
        *_requeue_lines(job),
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def _requeue_lines(job: JobConfig) -> list[str]:
    """How the attempt ended, as rank 0 recorded it (checkpoint/stop.py): every step done
    counts as success whatever torchrun's exit code (a stop signal after the last step makes it
    exit 1); a stop on the warning signal, once every rank's checkpoint was saved, requeues
    this job: it runs this script again and resumes from that checkpoint in the same run dir,
    unless a search pruned it (its stop is final)."""
    record = shlex.quote(str(Path(job.run_dir).absolute() / ATTEMPT_JSON))
    pruned = shlex.quote(str(Path(job.run_dir).absolute() / SEARCH_TRIAL_JSON))
    lines = [f"if grep -qs '\"state\": \"finished\"' {record}; then",
             "  status=0  # every step ran; a signal after the last made torchrun exit 1",
             "fi"]
    if not job.launcher.slurm.requeue:
        return lines
    return [
        *lines,
        "# On the signal before the time limit every rank saved a checkpoint and stopped: run",
        "# again (scontrol requeue ends this attempt) and resume from it in this run dir; a",
        "# trial a search pruned stays stopped.",
        f"if grep -qs '\"state\": \"stopped\"' {record} && [ ! -e {pruned} ]; then",
        f"  echo \"orchestrator: requeueing job $SLURM_JOB_ID: $(tr -d '\\n' < {record})\"",
        f"  rm -f {record}",
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
    ]


def submit_argv(job: JobConfig, script: Path) -> list[str]:
    log = Path(job.run_dir) / "slurm-%j.out"
    return ["sbatch", "--parsable", f"--job-name={job_name(job.run_dir)}", f"--output={log}",
            str(script)]


def submit_env(plan: Plan, job: JobConfig) -> dict[str, str]:
    """sbatch's environment, which it exports to the job: this one plus the job's secrets
    (`secrets.secret_env`) and the plan's secret-named variables (left out of the script)."""
    secret_vars = {k: v for k, v in plan.env.items() if is_secret_key(k)}
    return {**os.environ, **secret_vars, **secret_env(job)}


def preflight(job: JobConfig, plan: Plan) -> None:
    """Fail fast on what can be checked here instead of queueing a doomed job (one that asks
    for GPUs, nodes or CPUs the partition does not have would wait in the queue forever).
    Writes nothing and needs no run dir yet: call it before the plan is written."""
    if shutil.which("sbatch") is None:
        raise ConfigError("launcher.name", "slurm", "a launcher whose tools are here: sbatch "
                          "is not on PATH (scripts/start_slurm.sh starts a local cluster)")
    partition, nodes = partition_nodes(job, cluster_nodes())
    if plan.nnodes > len(nodes):
        raise ConfigError("cluster.nodes", plan.nnodes,
                          f"at most {len(nodes)} (nodes in partition {partition})")
    if plan.device == "cuda":
        most = max(n.gpus for n in nodes)
        if most == 0:
            raise ConfigError("cluster.gpus_per_node", plan.nproc_per_node,
                              f"a partition with GPUs: partition {partition} has no 'gpu' gres "
                              "(sinfo -o %G); choose launcher.slurm.partition, or "
                              "cluster.device=cpu")
        if plan.nproc_per_node > most:
            raise ConfigError("cluster.gpus_per_node", plan.nproc_per_node,
                              f"at most {most} ('gpu' gres per node in partition {partition})")
        nodes = usable_nodes(plan, nodes)
        if plan.nnodes > len(nodes):
            raise ConfigError("cluster.nodes", plan.nnodes,
                              f"at most {len(nodes)} (nodes with {plan.nproc_per_node} GPUs "
                              f"in partition {partition})")
    want = job.launcher.slurm.cpus_per_task
    if want is not None:
        cap = sorted((n.cpus for n in nodes), reverse=True)[plan.nnodes - 1]
        if want > cap:
            raise ConfigError("launcher.slurm.cpus_per_task", want,
                              f"at most {cap} (CPUs per node on {plan.nnodes} nodes of "
                              f"partition {partition})")
    run_dir = Path(job.run_dir).absolute()
    existing = next(d for d in (run_dir, *run_dir.parents) if d.exists())  # to be created
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError("run_dir", str(run_dir), "a writable directory")


def write_script(plan: Plan, job: JobConfig) -> Path:
    """Render `<run_dir>/job.sbatch`, asking Slurm (when its tools are here) for the CPUs of a
    node of the partition."""
    path = Path(job.run_dir) / SCRIPT
    path.write_text(render_script(plan, job, node_cpus(job, plan)))
    return path


def launch_slurm(plan: Plan, job: JobConfig) -> SlurmHandle:
    """Submit exactly the script `action=plan` wrote (rendered again only if it is missing).
    The CLI has run `preflight` already, before anything was written."""
    script = Path(job.run_dir) / SCRIPT
    if not script.exists():
        write_script(plan, job)
    argv = submit_argv(job, script)
    job_id = run_checked(argv, env=submit_env(plan, job)).strip().split(";")[0]
    record = {"job_id": job_id, "submit": argv, "script": str(script),
              "log": str(Path(job.run_dir) / f"slurm-{job_id}.out")}
    (Path(job.run_dir) / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    print(f"submitted Slurm job {job_id}; log: {record['log']}")
    return SlurmHandle(job_id, Path(job.run_dir), job.launcher.slurm.poll_s)
