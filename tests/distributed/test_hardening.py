"""A job never outlives its launcher, never shares a run dir, and never hangs on a stalled rank
(issue 11): real 2-rank torchrun jobs with W&B offline, signalled the way users and schedulers
do it. Every process of a job carries a mark in its environment, so the test can see exactly
what is left of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from orchestrator.common.lifeline import processes_with_env
from tests.distributed.checks import until

MARK = "ORCHESTRATOR_TEST_MARK"


def marked(mark: str) -> list[int]:
    """PIDs whose environment holds MARK=mark (the launcher and everything it started)."""
    return processes_with_env(MARK, mark)


def start(run_dir: Path, *overrides: str, stderr: Any = subprocess.PIPE
          ) -> tuple[subprocess.Popen[str], str]:
    mark = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", f"hydra.run.dir={run_dir}", "train.steps=100000",
         "train.save_model=false", "logging.progress=false", *overrides],
        env={**os.environ, MARK: mark}, stdout=subprocess.PIPE, stderr=stderr, text=True)
    return proc, mark


def training(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.exists() and '"step"' in metrics.read_text()


def test_sigterm_to_the_launcher_stops_the_whole_job(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc, mark = start(run_dir)
    try:
        until(lambda: training(run_dir), 120, "the first logged step")
        assert len(marked(mark)) >= 5  # launcher, torchrun, 2 ranks, the W&B service
        # meanwhile, a second launch into the same dir is refused, naming the holder
        second = subprocess.run(
            [sys.executable, "-m", "orchestrator", "action=plan", "run.overwrite=true",
             f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert second.stderr.splitlines() == [
            f"error: run dir {run_dir} is in use by another launch (PID {proc.pid} on "
            f"{os.uname().nodename}); wait for it to end or choose another hydra.run.dir"]
        os.kill(proc.pid, signal.SIGTERM)
        until(lambda: not marked(mark), 60, "every process of the job to exit")
        _, err = proc.communicate(timeout=10)
    finally:
        for pid in marked(mark):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.splitlines()[-1] == "error: interrupted by SIGTERM: the job was stopped"


def test_a_stalled_rank_is_named_and_dies_with_a_killed_launcher(tmp_path: Path) -> None:
    """A rank stopped with SIGSTOP: the other's collective times out after dist.timeout_s with
    one line naming it; then the launcher is killed with SIGKILL (no chance to clean up) and
    still nothing of the job survives, not even the stopped rank."""
    run_dir = tmp_path / "run"
    err = tmp_path / "stderr.txt"
    with open(err, "w") as sink:
        proc, mark = start(run_dir, "dist.timeout_s=5", "logging=none", stderr=sink)
    want = ("error: a collective on rank 0 timed out after 5 s (dist.timeout_s); stopped "
            "responding: rank 1")
    try:
        until(lambda: training(run_dir), 120, "the first logged step")
        ranks = [pid for pid in marked(mark)
                 if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                 and b"recipes.pretrain" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(ranks) == 1
        os.kill(ranks[0], signal.SIGSTOP)  # alive, holding its sockets, never answering
        until(lambda: want in err.read_text().splitlines(), 60, "the timeout's error line")
        os.kill(proc.pid, signal.SIGKILL)
        until(lambda: not marked(mark), 30, "every process of the job to exit")
    finally:
        for pid in marked(mark):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
