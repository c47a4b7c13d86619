"""Against a real Slurm controller and two slurmd daemons on this machine
(scripts/start_slurm.sh, which .ci/run's test command starts)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from orchestrator.common.lifeline import processes_with_env
from orchestrator.common.records import read_metrics
from tests.conftest import run_cli, run_ok
from tests.distributed.checks import losses, reference_losses
from tests.slurm.conftest import scontrol

pytestmark = pytest.mark.slurm
TWO_NODES = ["+recipe=ddp", "launcher=slurm", "cluster.nodes=2", "cluster.gpus_per_node=1"]
GPU_JOB = ["+recipe=fsdp_zero3", "launcher=slurm", "cluster.device=cuda", "cluster.gpu=h100",
           "cluster.gpus_per_node=8", "cluster.nodes=2"]


def test_two_node_job_trains_and_runs_the_dry_run_script(slurm, tmp_path) -> None:
    # the same job planned, then run: the script carries the config's hash, so the two
    # scripts are equal only when the configs are
    run_ok([*TWO_NODES, "launcher.slurm.wait=true", "action=plan"], tmp_path, env=slurm)
    planned_script = (tmp_path / "job.sbatch").read_text()
    assert not (tmp_path / "slurm_job.json").exists()  # the dry run submitted nothing
    lines = planned_script.splitlines()  # the test nodes have one CPU each (sinfo %c)
    assert "#SBATCH --cpus-per-task=1" in lines and "export OMP_NUM_THREADS=1" in lines
    assert " --cpus-per-task=1 " in next(x for x in lines if x.startswith("srun "))
    assert "#SBATCH --signal=USR1@120" in lines and "#SBATCH --requeue" in lines
    run_ok([*TWO_NODES, "launcher.slurm.wait=true"], tmp_path, env=slurm)
    record = json.loads((tmp_path / "slurm_job.json").read_text())
    ran = scontrol("write", "batch_script", record["job_id"], "-")  # what Slurm executed
    assert ran == planned_script
    log = Path(record["log"]).read_text(errors="replace")
    assert "rendezvous node1:" in log  # the first node's Slurm hostname (start_slurm.sh's hosts)
    (start,) = read_metrics(tmp_path / "metrics.jsonl", events=True)
    assert start["world_size"] == 2 and sorted(start["nodes"]) == ["node1", "node2"]
    got = losses(tmp_path)
    assert len(got) == 20 and got[-1] < got[0] - 0.1
    status = run_cli(["action=status", f"run_dir={tmp_path}"], tmp_path / "status", env=slurm)
    assert status.returncode == 0 and "COMPLETED" in status.stdout


def test_the_time_limit_warning_checkpoints_requeues_and_the_job_finishes(slurm, tmp_path) -> None:
    """A 1-minute job that needs more (2 s a step), warned 15 s before its limit with USR1:
    both nodes' torchruns pass it on, the ranks stop after the same step with a checkpoint, the
    script requeues the job, and the job (same id, same run dir) resumes. After one or more
    such stops all 20 steps are done, each logged once, and the losses are the uninterrupted
    2-rank reference exactly. (slurmctld checks time limits every 30 s and warns up to 30 s
    early: here 15-45 s into each attempt, always at least 30 s before the kill.)"""
    run_ok([*TWO_NODES, "launcher.slurm.wait=true", "launcher.slurm.time=00:01:00",
                    "launcher.slurm.signal=USR1@15", "debug.step_delay_s=2.0", "logging=none",
                    "train.save_model=false"], tmp_path, env=slurm)
    job_id = json.loads((tmp_path / "slurm_job.json").read_text())["job_id"]
    log = (tmp_path / f"slurm-{job_id}.out").read_text(errors="replace")
    requeues = log.count(f"orchestrator: requeueing job {job_id}:")
    assert requeues >= 1, log[-3000:]
    assert f"Restarts={requeues} " in scontrol("show", "job", job_id)
    events = read_metrics(tmp_path / "metrics.jsonl", events=True)
    assert len([e for e in events if e.get("event") == "start"]) == requeues + 1
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 21))
    assert losses(tmp_path) == reference_losses()


def test_sweep_submits_one_job_per_point_and_summarises(slurm, tmp_path) -> None:
    cmd = ["-m", *TWO_NODES, "optim.lr=1e-3,3e-3", "train.steps=3",
           f"hydra.sweep.dir={tmp_path}"]
    run_ok(cmd, tmp_path / "unused", env=slurm)
    summary = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert [p["state"] for p in summary["points"]] == ["COMPLETED", "COMPLETED"]
    job_ids = {json.loads((tmp_path / p / "slurm_job.json").read_text())["job_id"]
               for p in ("0", "1")}
    assert len(job_ids) == 2
    # the best point is the one whose own metrics.jsonl ends on the lowest loss
    final = {}
    for p in ("0", "1"):
        rows = [json.loads(line) for line in (tmp_path / p / "metrics.jsonl").read_text()
                .splitlines() if line.strip()]
        final[p] = [r["loss"] for r in rows if "loss" in r][-1]
    assert abs(final["0"] - final["1"]) > 1e-3  # distinct, so "lowest" means something
    assert summary["best"] == min(final, key=final.get)
    assert {p["point"]: p["final_loss"] for p in summary["points"]} == final
    assert (tmp_path / "loss_curves.png").read_bytes().startswith(b"\x89PNG")
    groups = {yaml.safe_load((tmp_path / p / "config.yaml").read_text())["logging"]["wandb"]
              ["group"] for p in ("0", "1")}
    assert groups == {tmp_path.name}  # one W&B group for the sweep


def test_cancel_ends_a_running_job(slurm, tmp_path) -> None:
    marker = f"ORCH_SLURM_{uuid.uuid4().hex}"
    run_ok([*TWO_NODES, "train.steps=100000", "logging=none"], tmp_path,
                   env={**slurm, "ORCH_TEST_MARKER": marker})
    job_id = json.loads((tmp_path / "slurm_job.json").read_text())["job_id"]
    deadline = time.monotonic() + 120
    while not (tmp_path / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(1)  # training has started on both nodes
    assert "JobState=RUNNING" in scontrol("show", "job", "-o", job_id)
    cancel = run_cli(["action=cancel", f"run_dir={tmp_path}"], tmp_path / "c", env=slurm)
    assert cancel.returncode == 0 and "CANCELLED" in cancel.stdout, cancel.stdout
    assert "JobState=CANCELLED" in scontrol("show", "job", "-o", job_id)
    deadline = time.monotonic() + 30
    while processes_with_env("ORCH_TEST_MARKER", marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_with_env("ORCH_TEST_MARKER", marker) == []


def test_injection_strings_execute_nothing(slurm, tmp_path) -> None:
    owned = Path(f"/tmp/owned_{uuid.uuid4().hex}")
    evil = f'x"; touch {owned} #'
    run_dir = tmp_path / evil
    run_ok([*TWO_NODES, "launcher.slurm.wait=true", "train.steps=3", "logging=none",
                    f"logging.wandb.name='{evil}'"], run_dir, env=slurm)
    assert len(losses(run_dir)) == 3 and not owned.exists()
    for override in (f"launcher.slurm.partition='debug; touch {owned}'",
                     f"launcher.slurm.extra_sbatch=['--comment=a $(touch {owned})']",
                     f"launcher.slurm.extra_sbatch=['-x; touch {owned}']"):
        bad = run_cli([*TWO_NODES, override], tmp_path / "bad", env=slurm)
        assert bad.returncode == 2 and "launcher.slurm" in bad.stderr, bad.stderr
    assert not owned.exists()


def test_preflight_rejects_what_the_cluster_cannot_run(slurm, tmp_path) -> None:
    part = run_cli([*TWO_NODES, "launcher.slurm.partition=gpu"], tmp_path / "a", env=slurm)
    assert part.returncode == 2 and "one of debug" in part.stderr
    nodes = run_cli([*TWO_NODES, "cluster.nodes=3"], tmp_path / "b", env=slurm)
    assert nodes.returncode == 2 and "at most 2" in nodes.stderr
    cpus = run_cli([*TWO_NODES, "launcher.slurm.cpus_per_task=4"], tmp_path / "c", env=slurm)
    assert cpus.returncode == 2, cpus.stderr[-3000:]
    assert "launcher.slurm.cpus_per_task" in cpus.stderr and "at most 1" in cpus.stderr
    assert not any((tmp_path / d / "slurm_job.json").exists() for d in "abc")


def test_gpu_job_on_a_cluster_without_gpus_is_refused_before_submission(slurm, tmp_path) -> None:
    from orchestrator.launch.slurm import job_name

    proc = run_cli(GPU_JOB, tmp_path, env=slurm)  # planned on this CPU-only submitting host
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert "cluster.gpus_per_node" in line and "no 'gpu' gres" in line, line
    assert "no CUDA device here" not in proc.stderr  # the submitting host is not checked
    assert not (tmp_path / "slurm_job.json").exists()
    assert f"JobName={job_name(str(tmp_path))} " not in scontrol("show", "job", "-o")
    queued = subprocess.run(["squeue", "-h", "-n", job_name(str(tmp_path)), "-o", "%i"],
                            capture_output=True, text=True, check=True).stdout
    assert queued.strip() == ""


def test_wait_ends_with_unknown_when_no_one_knows_the_job(slurm, tmp_path, capsys) -> None:
    from orchestrator.launch.slurm_job import GONE_POLLS, SlurmHandle

    handle = SlurmHandle("999999", tmp_path, poll_s=0.1)  # never submitted on this cluster
    codes: list[int] = []
    # scontrol: invalid job id; sacct: accounting storage disabled (a daemon thread, so a
    # wait that never ends fails the test instead of hanging it)
    waiter = threading.Thread(target=lambda: codes.append(handle.wait()), daemon=True)
    waiter.start()
    waiter.join(timeout=10 + GONE_POLLS * 0.1)
    assert not waiter.is_alive(), "wait() did not return for a job no one knows"
    assert codes and codes[0] != 0
    assert handle.status() == "UNKNOWN" and handle.gone
    err = capsys.readouterr().err
    assert "999999" in err and "UNKNOWN" in err and "MinJobAge" in err


def test_preflight_runs_before_the_run_dir_exists_and_writes_nothing(slurm, tmp_path) -> None:
    from orchestrator.common.errors import ConfigError
    from orchestrator.launch.slurm import preflight
    from orchestrator.planning.plan import make_plan
    from tests.conftest import make_job

    run_dir = tmp_path / "not" / "yet"
    job = make_job(TWO_NODES, run_dir=str(run_dir))
    plan = make_plan(job, "cpu", 2)
    preflight(job, plan)
    assert list(tmp_path.iterdir()) == []
    bad = make_job([*TWO_NODES, "cluster.nodes=3"], run_dir=str(run_dir))
    with pytest.raises(ConfigError, match="at most 2"):
        preflight(bad, make_plan(bad, "cpu", 2))
    (tmp_path / "file").write_text("")
    blocked = make_job(TWO_NODES, run_dir=str(tmp_path / "file" / "run"))
    with pytest.raises(ConfigError, match="run_dir"):
        preflight(blocked, make_plan(blocked, "cpu", 2))


def test_sbatch_hands_the_secrets_to_the_job_through_its_environment(slurm, tmp_path) -> None:
    from orchestrator.common.secrets import ENV_VAR
    from orchestrator.launch.slurm import submit_env
    from orchestrator.planning.plan import make_plan
    from tests.conftest import make_job

    secret = f"sk_{uuid.uuid4().hex}"
    job = make_job([*TWO_NODES, "parallelism.backend=deepspeed",
                    f"+parallelism.deepspeed.comet.api_key={secret}"], run_dir=str(tmp_path))
    script = tmp_path / "probe.sbatch"  # the job echoes what the ranks would receive
    script.write_text(f'#!/bin/bash\nprintenv {ENV_VAR} > "{tmp_path}/seen"\n')
    out = subprocess.run(["sbatch", "--parsable", "--wait", f"--output={tmp_path}/log",
                          str(script)], env=submit_env(make_plan(job, "cpu", 2), job),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert secret in (tmp_path / "seen").read_text()
    assert secret not in script.read_text()


def test_sacct_output_parses_to_the_final_state() -> None:
    from orchestrator.launch.slurm_job import parse_sacct_state

    assert parse_sacct_state("CANCELLED by 0\n") == "CANCELLED"
    assert parse_sacct_state("COMPLETED\n") == "COMPLETED"
    assert parse_sacct_state("OUT_OF_ME+\n") == "OUT_OF_ME"
    assert parse_sacct_state("\n") is None
