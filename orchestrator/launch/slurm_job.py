"""A submitted Slurm job: its state (the controller's, else the accounting's), waiting for it,
cancelling it, and its record in the run directory (`slurm_job.json`). A job purged from the
controller (MinJobAge) is asked of the accounting (sacct); when neither knows it,
`SlurmHandle.wait` ends with state UNKNOWN after a few polls.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from orchestrator.common.contract import SLURM_RECORD
from orchestrator.common.errors import ConfigError, LaunchError
from orchestrator.config.schema import JobConfig

RECORD = SLURM_RECORD
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
            "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Consecutive polls in which neither scontrol nor sacct knows a job before `wait` gives up.
GONE_POLLS = 5


def run_checked(argv: list[str], timeout_s: float = 60,
                env: Optional[dict[str, str]] = None) -> str:
    """A Slurm command's stdout; a LaunchError with its stderr when it fails."""
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env)
    if out.returncode:
        raise LaunchError(f"{argv[0]} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


def parse_sacct_state(out: str) -> Optional[str]:
    """The job's state from `sacct -n -X -P -o State` output: 'CANCELLED by 0' -> 'CANCELLED';
    None when it lists nothing."""
    for line in out.splitlines():
        words = line.split()
        if words:
            return words[0].rstrip("+")
    return None


def sacct_state(job_id: str, timeout_s: float = 60) -> Optional[str]:
    """The job's state in Slurm's accounting; None when sacct is not here, accounting is off
    ("Slurm accounting storage is disabled") or it does not know the job."""
    if shutil.which("sacct") is None:
        return None
    try:
        out = subprocess.run(["sacct", "-j", job_id, "-n", "-X", "-P", "-o", "State"],
                             capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_sacct_state(out.stdout) if out.returncode == 0 else None


class SlurmHandle:
    def __init__(self, job_id: str, run_dir: Path, poll_s: float = 2.0) -> None:
        self.job_id, self.run_dir, self.poll_s = job_id, run_dir, poll_s
        self.gone = False  # the last status(): neither scontrol nor sacct knew the job

    def status(self) -> str:
        """The job's state: the controller's (scontrol), else the accounting's (sacct: the
        controller forgets a finished job after MinJobAge), else UNKNOWN."""
        out = subprocess.run(["scontrol", "show", "job", "-o", self.job_id],
                             capture_output=True, text=True, timeout=60)
        found = re.search(r"JobState=(\S+)", out.stdout)
        if found:
            self.gone = False
            return found.group(1)
        state = sacct_state(self.job_id)
        # "Invalid job id": the controller does not know it (a controller that cannot be
        # reached is not evidence that the job is gone)
        self.gone = state is None and "invalid job id" in out.stderr.lower()
        return state or "UNKNOWN"

    def wait(self) -> int:
        """0 when the job COMPLETED; 1 when it ended otherwise, or when neither scontrol nor
        sacct has known it for GONE_POLLS polls in a row (state UNKNOWN, said on stderr)."""
        gone = 0
        while (state := self.status()) not in TERMINAL:
            gone = gone + 1 if self.gone else 0
            if gone >= GONE_POLLS:
                print(f"Slurm job {self.job_id}: neither scontrol nor sacct knows it (purged "
                      "from the controller after MinJobAge with accounting off, or never "
                      f"submitted); its final state is UNKNOWN; see the log in {self.run_dir}",
                      file=sys.stderr)
                return 1
            time.sleep(self.poll_s)
        return 0 if state == "COMPLETED" else 1

    def cancel(self, timeout_s: float = 120) -> str:
        run_checked(["scancel", self.job_id])
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


def status_or_cancel(job: JobConfig) -> int:
    """`action=status` / `action=cancel run_dir=...`: the Slurm job of an earlier launch."""
    handle = SlurmHandle.load(Path(job.run_dir))
    if job.action == "cancel":
        state = handle.cancel()
        print(f"Slurm job {handle.job_id}: {state}")
        return 0 if state == "CANCELLED" else 1
    record = json.loads((Path(job.run_dir) / RECORD).read_text())
    print(f"Slurm job {handle.job_id}: {handle.status()}; log: {record['log']}")
    return 0
