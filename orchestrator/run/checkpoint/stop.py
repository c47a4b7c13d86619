"""Checkpoint and stop on a signal: Slurm's warning before the time limit or preemption
(`launcher.slurm.signal`, USR1 by default), or `kill -USR1` sent to a local launch.

torchrun is told to handle the signal (`--signals-to-handle`), so it passes it on to every rank
(its workers live in sessions of their own, where a signal to the job's process group never
reaches them) and waits `fault.stop_timeout_s` for them. Each rank only notes the signal; after
every step the ranks agree (one tiny all-reduce on a CPU group of its own, never a device sync,
read one step later so that no step waits for it) whether any of them got it, and all stop after
the same step: they save a checkpoint, rank 0 records the stop in `<run_dir>/attempt.json`, and
every rank exits 0. The Slurm script then requeues the job (`launcher.slurm.requeue`), which
resumes from that checkpoint in the same run directory; the local launcher reports the stop and
how to resume.

torchrun exits non-zero once it got the signal, even when the ranks had already finished every
step (a signal after the last vote). So rank 0 also records a finished attempt, and both the
Slurm script and the local launcher take a finished record over torchrun's exit code.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

from orchestrator.common.attempt import record_attempt
from orchestrator.config.launcher import stop_signal
from orchestrator.config.schema import JobConfig

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
        self.pending: tuple[Any, Any] | None = None  # the vote in flight: (work, its tensor)
        signal.signal(getattr(signal, self.name), self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.got = 1

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank had been signalled by the end of the
        previous step. The vote is an all-reduce on a gloo group of its own, started after a
        step and read after the next, so no step waits for it: a stop takes effect one step
        later than the signal, on every rank alike."""
        import torch
        import torch.distributed as dist

        if self.group is None:  # the first vote, at the same point on every rank
            self.group = dist.new_group(backend="gloo")
        agreed = False
        if self.pending is not None:
            work, vote = self.pending
            work.wait()
            agreed = bool(vote.item())
        vote = torch.tensor([self.got], dtype=torch.int32)
        self.pending = (dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.group,
                                        async_op=True), vote)
        return agreed

    def close(self) -> None:
        """Every rank, after its last vote: wait for the vote still in flight (no collective is
        left running when the process group goes)."""
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None


def record(job: JobConfig, stopped: Stopped | None, step: int) -> None:
    """Rank 0: how this attempt ended (`stopped`, or finished after `step`), for the Slurm
    script and the local launcher."""
    info: dict[str, Any] = {"state": "finished", "step": step}
    if stopped is not None:
        info = {"state": "stopped", "signal": stopped.signal_name, "step": stopped.step,
                "checkpoint": stopped.checkpoint}
    record_attempt(job.run_dir, info)
