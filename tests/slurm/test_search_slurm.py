"""`action=search` with Slurm trials, on the local Slurm cluster: each trial a job of its own.

One study of 4 trials, 2 in flight (1-node, 1-rank trials of gpt2_tiny), a grid over 4
learning rates (each point once: the study ends when the grid does). While it runs, trial
0's job is sent the time-limit warning signal (USR1 to the job's steps, what slurmctld sends
before the limit): it checkpoints, is requeued, and finishes as the same trial. Then the
controller is SIGKILLed with 2 trials' jobs live, and the same command finishes the study:
those jobs are re-attached (the same job ids, no new submission), no trial failed, and the best
trial is the best of the trials' own metrics files. The study lives in an SQLite database
(Optuna's RDBStorage, `search.storage`), which Optuna's own `load_study` reads back.

A pruned Slurm trial's stop is final: its job is sent the same signal, and with the search's
marker in its run dir the job is not requeued and its metrics end early.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.common.records import read_metrics
from tests.conftest import REPO, cli_command, run_ok
from tests.slurm.conftest import scontrol

pytestmark = pytest.mark.slurm
TRIAL = ["model=gpt2_tiny", "train.steps=10", "logging=none", "train.save_model=false",
         "launcher=slurm", "launcher.slurm.wait=true", "launcher.slurm.poll_s=0.5",
         "cluster.nodes=1", "cluster.gpus_per_node=1", "debug.step_delay_s=0.5"]
SEARCH = ["action=search", "search=example", "search.trials=4", "search.parallel=2",
          "search.pruner=none", "search.sampler=grid",
          "+search.params.optim.lr='choice(1e-3, 3e-3, 1e-2, 3e-2)'",
          "+search.params.train.micro_batch_size='choice(2)'",  # the grid: 4 points
          "eval.every_steps=5", "eval.holdout=0.1", *TRIAL]


def _wait_for(what, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, f"timed out waiting for {what.__doc__}"
        time.sleep(0.2)


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path)] if path.is_file() else []


def _job(run_dir: Path) -> str:
    return json.loads((run_dir / "slurm_job.json").read_text())["job_id"]


def _requeued(run_dir: Path) -> bool:
    """the job's log says it was requeued"""
    logs = list(run_dir.glob("slurm-*.out"))
    return any("orchestrator: requeueing job" in p.read_text(errors="replace") for p in logs)


@pytest.fixture(scope="module")
def study(slurm, tmp_path_factory) -> tuple[Path, dict[str, str], str]:
    out = tmp_path_factory.mktemp("slurm-search") / "study"
    first, second = out / "trial-0000", out / "trial-0001"
    search = [*SEARCH, f"search.storage='sqlite:///{out}/study.db'", "search.study=study"]
    proc = subprocess.Popen(cli_command(search, out), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, **slurm})

    def trial0_logged() -> bool:
        """trial 0's second step"""
        return len(_steps(first)) >= 2

    _wait_for(trial0_logged)
    subprocess.run(["scancel", "--signal=USR1", _job(first)], check=True, env=slurm)
    _wait_for(lambda: _requeued(first))

    def second_running() -> bool:
        """trial 1's first step"""
        return bool(_steps(second))

    _wait_for(second_running)
    os.kill(proc.pid, signal.SIGKILL)  # the controller; its trials' jobs run on
    proc.wait()
    live = {d.name: _job(d) for d in (first, second)}
    states = {d.name: scontrol("show", "job", "-o", live[d.name]) for d in (first, second)}
    assert all("JobState=COMPLETED" not in s for s in states.values()), states
    again = run_ok(search, out, env=slurm)
    return out, live, again.stdout


def test_live_trials_are_reattached_and_none_failed(study) -> None:
    out, live, stdout = study
    for name, job_id in live.items():
        assert _job(out / name) == job_id  # re-attached, not submitted again
        assert f"trial {int(name[-4:])} re-attached" in stdout
    trials = json.loads((out / "search_summary.json").read_text())["trials"]
    assert sorted(t["number"] for t in trials) == [0, 1, 2, 3]
    assert sorted(t["params"]["optim.lr"] for t in trials) == [1e-3, 3e-3, 1e-2, 3e-2]
    assert all(t["state"] == "COMPLETE" for t in trials), trials
    jobs = {_job(out / f"trial-{n:04d}") for n in range(4)}
    assert len(jobs) == 4  # one job per trial, none resubmitted
    best = min(trials, key=lambda t: [r["val/loss"] for r in read_metrics(
        Path(t["run_dir"]) / "metrics.jsonl") if "val/loss" in r][-1])
    assert trials[0]["number"] == best["number"]
    import optuna

    loaded = optuna.load_study(study_name="study", storage=f"sqlite:///{out}/study.db")
    assert loaded.best_trial.number == best["number"] and len(loaded.trials) == 4
    assert not (out / "study.journal").exists()


def test_the_preempted_trial_was_requeued_and_finished_as_the_same_trial(study) -> None:
    out, live, _ = study
    job_id = live["trial-0000"]
    assert "Restarts=1 " in scontrol("show", "job", job_id)
    assert _steps(out / "trial-0000") == list(range(1, 11))  # every step once: it resumed
    assert not (out / "trial-0000" / "search_trial.json").exists()


def test_a_pruned_slurm_trial_is_not_requeued(slurm, tmp_path) -> None:
    """The stop the search sends a Slurm trial (launch/trials.py: stop), on a plain run."""
    from orchestrator.launch.trials import Running, stop

    run = subprocess.Popen(cli_command([*TRIAL, "train.steps=30"], tmp_path), cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, **slurm})

    def logged() -> bool:
        """the run's second step"""
        return len(_steps(tmp_path)) >= 2

    _wait_for(logged)
    stop(Running(None, run, tmp_path, tmp_path / "metrics.jsonl"), 2)
    output = run.communicate(timeout=240)[0]
    assert run.returncode == 128 + signal.SIGUSR1, output
    assert "stopped by SIGUSR1 after step " in output
    job = scontrol("show", "job", "-o", _job(tmp_path))
    assert "Restarts=0 " in job and "JobState=FAILED" in job, job
    assert not _requeued(tmp_path)
    assert 2 <= max(_steps(tmp_path)) < 30  # every rank stopped after the same step
    assert json.loads((tmp_path / "search_trial.json").read_text())["state"] == "PRUNED"
