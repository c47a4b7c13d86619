"""Local launcher: the plan's single-node command (torchrun, or the recipe itself for one rank)
in its own process group, tied to the launcher (launchers/lifeline.py), so cancelling, failing
or killing the launcher never leaves a stray process behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from types import FrameType

from orchestrator.common.errors import OrchestratorError
from orchestrator.common.lifeline import TOKEN_ENV, die_with_parent, kill_token
from orchestrator.common.plan import Plan

FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
# passed on to the job, which saves a checkpoint and stops (checkpoint/stop.py)
STOP = signal.SIGUSR1


class Interrupted(OrchestratorError):
    """The launcher was told to stop (Ctrl-C, SIGTERM, SIGHUP); the job has been stopped."""

    def __init__(self, sig: int) -> None:
        self.exit_code = 128 + sig
        super().__init__(f"interrupted by {signal.Signals(sig).name}: the job was stopped")


class _Signalled(BaseException):
    def __init__(self, sig: int) -> None:
        self.sig = sig


@contextlib.contextmanager
def _forwarding(pass_on: Callable[[int], None]) -> Iterator[None]:
    """TERM, HUP and INT become an exception in the waiting launcher; USR1 is passed on to the
    job (`pass_on`). Main thread only."""

    def handler(sig: int, frame: FrameType | None) -> None:
        if sig == STOP:
            pass_on(sig)
            return
        raise _Signalled(sig)

    try:
        old = {s: signal.signal(s, handler) for s in (*FORWARDED, STOP)}
    except ValueError:  # not the main thread: nothing to forward from here
        yield
        return
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class LocalHandle:
    def __init__(self, proc: subprocess.Popen[bytes], token: str) -> None:
        self.proc = proc
        self.pgid = proc.pid  # start_new_session: the child leads its own process group
        self.token = token

    def status(self) -> str:
        code = self.proc.poll()
        return "RUNNING" if code is None else ("COMPLETED" if code == 0 else "FAILED")

    def wait(self) -> int:
        """The job's exit code. TERM, HUP or INT to the launcher stops the whole job, waits for
        it, and raises `Interrupted`; USR1 asks the job to checkpoint and stop."""
        try:
            with _forwarding(self._signal):
                code = self.proc.wait()
        except (_Signalled, KeyboardInterrupt) as e:
            sig = e.sig if isinstance(e, _Signalled) else signal.SIGINT
            self.cancel()
            raise Interrupted(sig) from None
        self._reap()
        return code

    def cancel(self, grace_s: float = 40.0) -> None:
        """SIGTERM to the job (torchrun passes it to its workers and gives them 30 s), SIGKILL
        after `grace_s`; then nothing of the job is left. Further signals wait until done."""
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
            self._reap(grace_s=2.0)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, sig)

    def _reap(self, grace_s: float = 5.0) -> None:
        """Anything of the job still alive after its leader exits is a stray: in the leader's
        process group, or (ranks, the W&B service) anywhere with the job's launch token."""
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                os.killpg(self.pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            self._signal(signal.SIGKILL)
        kill_token(self.token, grace_s=max(0.0, deadline - time.monotonic()))


def launch_local(plan: Plan, extra_env: dict[str, str] | None = None) -> LocalHandle:
    """Start the plan's command; `extra_env` (e.g. secrets) reaches the job's environment only,
    never a file."""
    if plan.nnodes != 1:
        raise ValueError("the local launcher runs single-node plans only")
    token = uuid.uuid4().hex
    env = {**os.environ, **plan.env, **(extra_env or {}), TOKEN_ENV: token}
    proc = subprocess.Popen(plan.commands[0], env=env, start_new_session=True,
                            preexec_fn=die_with_parent)
    return LocalHandle(proc, token)
