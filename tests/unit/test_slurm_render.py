"""The sbatch script of a GPU job, rendered on this CPU-only machine (no Slurm needed)."""

from __future__ import annotations

import json
import subprocess

import pytest

from orchestrator.errors import ConfigError
from orchestrator.launchers.slurm import gres_gpus, render_script
from orchestrator.plan import Plan, make_plan
from orchestrator.schema import JobConfig
from tests.conftest import make_job, run_cli

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


def test_no_signal_by_default_and_the_configured_one_when_set() -> None:
    plan, job = gpu_plan()
    assert job.launcher.slurm.signal is None
    assert "--signal" not in render_script(plan, job, cpus=64)
    plan, job = gpu_plan(["launcher.slurm.signal=USR1@90"])
    assert "#SBATCH --signal=USR1@90" in render_script(plan, job, cpus=64).splitlines()
    plan, job = gpu_plan(["launcher.slurm.signal='USR1@90; touch x'"])
    with pytest.raises(ConfigError, match="launcher.slurm.signal"):
        render_script(plan, job, cpus=64)


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
    proc = run_cli([*GPU_JOB, "action=plan"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "plan.json").read_text())["backend"] == "nccl"
    script = (tmp_path / "job.sbatch").read_text()
    lines = script.splitlines()
    assert "#SBATCH --gpus-per-node=8" in lines and "export ORCHESTRATOR_DEVICE=cuda" in lines
    # all CPUs of a node: counted by sinfo, or (no Slurm with GPUs here) whole nodes
    assert ([x for x in lines if x.startswith("#SBATCH --cpus-per-task=")]
            or "#SBATCH --exclusive" in lines)
    assert "--cpus-per-task=" in srun_line(script) and "--signal" not in script
    assert not (tmp_path / "slurm_job.json").exists()
