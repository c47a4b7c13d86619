"""Checkpoint and stop on a signal: Slurm's warning before the time limit or preemption
(`launcher.slurm.signal`, USR1 by default), or `kill -USR1` sent to a local launch.

torchrun is told to handle the signal (`--signals-to-handle`), so it passes it on to every rank
(its workers live in sessions of their own, where a signal to the job's process group never
reaches them) and waits `fault.stop_timeout_s` for them. Each rank only notes the signal; at the
end of every step the ranks agree (one tiny all-reduce on a CPU group, never a device sync)
whether any of them got it, and all stop after the same step: they save a checkpoint, rank 0
records the stop in `<run_dir>/attempt.json`, and every rank exits 0. The Slurm script then
requeues the job (`launcher.slurm.requeue`), which resumes from that checkpoint in the same run
directory; the local launcher reports the stop and how to resume.

torchrun exits non-zero once it got the signal, even when the ranks had already finished every
step (a signal after the last vote). So rank 0 also records a finished attempt, and both the
Slurm script and the local launcher take a finished record over torchrun's exit code.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import FrameType
from typing import Any

from orchestrator.schema import JobConfig

# how this attempt of the run ended, by rank 0: {"state": "stopped", "signal", "step",
# "checkpoint"} or {"state": "finished", "step"}; removed when the next attempt starts
ATTEMPT_FILE = "attempt.json"
# torchrun's own default list, which it turns into a clean shutdown of its workers
TORCHRUN_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


def stop_signal(job: JobConfig) -> str:
    """The signal that means "checkpoint and stop", e.g. "SIGUSR1": the one sbatch sends
    before the time limit under Slurm (`launcher.slurm.signal`, "[R:]USR1@120" -> SIGUSR1),
    else SIGUSR1."""
    spec = job.launcher.slurm.signal if job.launcher.name == "slurm" else None
    name = (spec or "USR1").split("@")[0].split(":")[-1].upper()
    return name if name.startswith("SIG") else f"SIG{name}"


def torchrun_flags(job: JobConfig) -> list[str]:
    """torchrun's options that pass the stop signal on to the ranks and wait for their
    checkpoint before killing them."""
    handled = ",".join((*TORCHRUN_SIGNALS, stop_signal(job)))
    return [f"--signals-to-handle={handled}", f"--shutdown-timeout={job.fault.stop_timeout_s}"]


_EARLY: set[int] = set()  # stop signals that arrived before the rank's StopRequest existed


def listen() -> None:
    """First thing in a rank (recipes/__init__.py, before torch is imported): note USR1 and
    USR2 instead of dying of them, so a stop signal during start-up is not lost."""
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda signum, frame: _EARLY.add(signum))


class Stopped(Exception):  # noqa: N818 - not an error: the run stopped as asked
    """Every rank stopped after `step` on `signal` and the checkpoint of that step is saved."""

    def __init__(self, signal_name: str, step: int, checkpoint: str) -> None:
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint "
                         f"{checkpoint}; the same run dir resumes from it")


class StopRequest:
    """Notes the stop signal in this rank from its creation on (create it first thing, so a
    signal during set-up counts too); `agreed()` tells every rank alike whether any rank got
    it."""

    def __init__(self, job: JobConfig) -> None:
        self.name = stop_signal(job)
        self.got = int(getattr(signal, self.name) in _EARLY)
        self.group: Any = None
        self.voted = False
        signal.signal(getattr(signal, self.name), self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.got = 1

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank has been signalled."""
        import torch
        import torch.distributed as dist

        if not self.voted:  # the first vote, at the same point on every rank
            self.voted = True
            # a CPU group: a gloo all-reduce of one number, no wait for the device
            if dist.get_backend() != "gloo":
                self.group = dist.new_group(backend="gloo")
        vote = torch.tensor([self.got], dtype=torch.int32)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.group)
        return bool(vote.item())


def record(job: JobConfig, stopped: Stopped | None, step: int) -> None:
    """Rank 0: how this attempt ended (`stopped`, or finished after `step`), for the Slurm
    script and the local launcher."""
    from orchestrator.rundir import write_atomic

    info: dict[str, Any] = {"state": "finished", "step": step}
    if stopped is not None:
        info = {"state": "stopped", "signal": stopped.signal_name, "step": stopped.step,
                "checkpoint": stopped.checkpoint}
    write_atomic(Path(job.run_dir) / ATTEMPT_FILE, json.dumps(info, indent=2) + "\n")


def take(run_dir: str | Path) -> dict[str, Any] | None:
    """How the last attempt ended (`record`), removed: None when it recorded nothing (it
    failed, or has not ended)."""
    path = Path(run_dir) / ATTEMPT_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    path.unlink(missing_ok=True)
    return info
