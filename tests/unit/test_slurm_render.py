"""The sbatch script of a GPU job, rendered on this CPU-only machine (no Slurm needed)."""

from __future__ import annotations

import json
import subprocess

import pytest

from orchestrator.common.errors import ConfigError
from orchestrator.common.plan import Plan
from orchestrator.config.schema import JobConfig
from orchestrator.launch.slurm import gres_gpus, render_script
from orchestrator.planning.plan import make_plan
from tests.conftest import make_job, run_cli, run_ok

GPU_JOB = ["+recipe=fsdp_zero3", "launcher=slurm", "cluster.device=cuda", "cluster.gpu=h100",
           "cluster.gpus_per_node=8", "cluster.nodes=2"]
RDZV = 'RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'


def gpu_plan(extra: list[str] | None = None) -> tuple[Plan, JobConfig]:
    job = make_job([*GPU_JOB, *(extra or [])], run_dir="/scratch/runs/big")
    return make_plan(job, "cuda", 2), job  # 2: this machine's CPUs must not leak into the script


def srun_line(script: str) -> str:
    (line,) = [x for x in script.splitlines() if x.startswith("srun ")]
    return line


def test_gpu_job_requests_gpus_and_all_cpus_of_a_node() -> None:
    plan, job = gpu_plan()
    assert plan.backend == "nccl"
    script = render_script(plan, job, cpus=64)  # a 64-CPU node of the partition
    lines = script.splitlines()
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8",
                      "--cpus-per-task=64"):
        assert f"#SBATCH {directive}" in lines
    assert "#SBATCH --exclusive" not in lines
    assert srun_line(script).startswith(
        "srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=64 --kill-on-bad-exit=1 ")
    assert "export OMP_NUM_THREADS=8" in lines  # 64 CPUs / 8 ranks per node
    assert "export OMP_NUM_THREADS=1" not in lines  # the plan's value is not exported
    assert "export ORCHESTRATOR_DEVICE=cuda" in lines


def test_the_warning_signal_reaches_the_ranks_and_a_stop_requeues_the_job() -> None:
    """By default Slurm warns 120 s before the time limit with USR1; torchrun is told to pass
    USR1 on to the ranks (which checkpoint and stop) and the script requeues the job when the
    ranks recorded such a stop, unless a search pruned it (search_trial.json). Run by a real
    Slurm cluster in tests/slurm/test_slurm.py and test_search_slurm.py."""
    plan, job = gpu_plan()
    script = render_script(plan, job, cpus=64)
    lines = script.splitlines()
    assert {"#SBATCH --signal=USR1@120", "#SBATCH --requeue", "#SBATCH --open-mode=append"} <= \
        set(lines)
    assert " --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=120 " \
        in srun_line(script)
    assert srun_line(script).endswith(" && status=0 || status=$?")  # set -e: go on to requeue
    record = "/scratch/runs/big/attempt.json"
    assert lines[-12:] == [
        f"if grep -qs '\"state\": \"finished\"' {record}; then",
        "  status=0  # every step ran; a signal after the last made torchrun exit 1",
        "fi",
        "# On the signal before the time limit every rank saved a checkpoint and stopped: run",
        "# again (scontrol requeue ends this attempt) and resume from it in this run dir; a",
        "# trial a search pruned stays stopped.",
        f"if grep -qs '\"state\": \"stopped\"' {record} && [ ! -e "
        "/scratch/runs/big/search_trial.json ]; then",
        f"  echo \"orchestrator: requeueing job $SLURM_JOB_ID: $(tr -d '\\n' < {record})\"",
        f"  rm -f {record}",
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$status"']
    plan, job = gpu_plan(["launcher.slurm.signal=R:USR2@300", "launcher.slurm.requeue=false"])
    script = render_script(plan, job, cpus=64)
    assert "#SBATCH --signal=R:USR2@300" in script.splitlines()
    assert "SIGQUIT,SIGUSR2 " in srun_line(script) and "requeue" not in script
    assert '"state": "finished"' in script  # success is success without requeueing too
    plan, job = gpu_plan(["launcher.slurm.signal=null"])
    assert "#SBATCH --signal" not in render_script(plan, job, cpus=64)


def test_a_signal_the_ranks_would_never_see_is_refused(tmp_path) -> None:
    """B: would signal the batch shell alone (more bad values: tests/unit/test_validate.py)."""
    proc = run_cli([*GPU_JOB, "launcher.slurm.signal=B:USR1@90", "action=validate"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: config key 'launcher.slurm.signal' has value 'B:USR1@90'; allowed: "
        "[R:]USR1@SECONDS or [R:]USR2@SECONDS (the warning every rank gets before the time "
        "limit), or null"]


def test_rendezvous_host_is_the_first_nodes_slurm_hostname() -> None:
    plan, job = gpu_plan()
    lines = render_script(plan, job, cpus=64).splitlines()
    assert RDZV in lines
    code = [x for x in lines if not x.startswith("#")]
    assert not [x for x in code if "NodeAddr" in x or "scontrol show node" in x]
    assert '"--rdzv-endpoint=${RDZV_HOST}:${RDZV_PORT}"' in srun_line("\n".join(lines))


def test_configured_cpus_per_task_wins_and_threads_are_at_least_one() -> None:
    plan, job = gpu_plan(["launcher.slurm.cpus_per_task=16"])
    script = render_script(plan, job, cpus=64)
    assert "#SBATCH --cpus-per-task=16" in script.splitlines()
    assert " --cpus-per-task=16 " in srun_line(script)
    assert "export OMP_NUM_THREADS=2" in script.splitlines()
    plan, job = gpu_plan(["launcher.slurm.cpus_per_task=4"])
    assert "export OMP_NUM_THREADS=1" in render_script(plan, job).splitlines()
    plan, job = gpu_plan(["launcher.slurm.cpus_per_task=0"])
    with pytest.raises(ConfigError, match="launcher.slurm.cpus_per_task"):
        render_script(plan, job)


@pytest.mark.parametrize("allocated, node_cpus, threads",
                         [("64(x2)", "64", "8"), ("72,64", "64", "8"), ("4(x2)", "4", "1")])
def test_unknown_node_size_takes_whole_nodes_and_reads_the_allocation(
        allocated: str, node_cpus: str, threads: str) -> None:
    plan, job = gpu_plan()
    script = render_script(plan, job, cpus=None)  # Slurm tools not here when rendering
    lines = script.splitlines()
    assert "#SBATCH --exclusive" in lines
    assert not [x for x in lines if x.startswith("#SBATCH --cpus-per-task")]
    assert ' "--cpus-per-task=${NODE_CPUS}" ' in srun_line(script)
    # Run the script's own CPU lines with the variable Slurm sets in the allocation.
    start = next(i for i, x in enumerate(lines) if x.startswith("NODE_CPUS="))
    end = next(i for i, x in enumerate(lines) if x.startswith("export OMP_NUM_THREADS="))
    body = "\n".join(["set -euo pipefail", *lines[start:end + 1],
                      'echo "$NODE_CPUS $OMP_NUM_THREADS"'])
    out = subprocess.run(["bash", "-c", body], capture_output=True, text=True, check=True,
                         env={"SLURM_JOB_CPUS_PER_NODE": allocated, "PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == [node_cpus, threads]


def test_gres_gpus() -> None:
    assert gres_gpus("(null)") == 0
    assert gres_gpus("gpu:h100:8(S:0-1)") == 8
    assert gres_gpus("gpu:4,shard:8") == 4
    assert gres_gpus("gpu:a100:2,gpu:h100:2") == 4
    assert gres_gpus("tmpdisk:100") == 0


def test_cli_plans_a_gpu_job_on_this_cpu_machine(tmp_path) -> None:
    run_ok([*GPU_JOB, "action=plan"], tmp_path)
    assert json.loads((tmp_path / "plan.json").read_text())["backend"] == "nccl"
    script = (tmp_path / "job.sbatch").read_text()
    lines = script.splitlines()
    assert "#SBATCH --gpus-per-node=8" in lines and "export ORCHESTRATOR_DEVICE=cuda" in lines
    # all CPUs of a node: counted by sinfo, or (no Slurm with GPUs here) whole nodes
    assert ([x for x in lines if x.startswith("#SBATCH --cpus-per-task=")]
            or "#SBATCH --exclusive" in lines)
    assert "--cpus-per-task=" in srun_line(script) and "--signal=USR1@120" in script
    assert not (tmp_path / "slurm_job.json").exists()
