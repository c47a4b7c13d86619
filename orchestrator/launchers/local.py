"""Local launcher: the plan's single-node command (torchrun, or the recipe itself for one rank)
in its own process group, so cancelling or failing never leaves a stray process behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

from orchestrator.plan import Plan


class LocalHandle:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pgid = proc.pid  # start_new_session: the child leads its own process group

    def status(self) -> str:
        code = self.proc.poll()
        return "RUNNING" if code is None else ("COMPLETED" if code == 0 else "FAILED")

    def wait(self) -> int:
        try:
            code = self.proc.wait()
        except KeyboardInterrupt:
            self.cancel()
            raise
        self._reap()
        return code

    def cancel(self, grace_s: float = 10.0) -> None:
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait()
        self._reap()

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, sig)

    def _reap(self, grace_s: float = 5.0) -> None:
        """Anything still in the job's process group after the leader exits is a stray."""
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                os.killpg(self.pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        self._signal(signal.SIGKILL)


def launch_local(plan: Plan) -> LocalHandle:
    if plan.nnodes != 1:
        raise ValueError("the local launcher runs single-node plans only")
    env = {**os.environ, **plan.env}
    proc = subprocess.Popen(plan.commands[0], env=env, start_new_session=True)
    return LocalHandle(proc)
