"""A job's processes die with the launcher that started them.

Three ties, because no single one covers every way a launcher ends:
- the launcher's direct child (torchrun, or the one-rank recipe) gets SIGKILL from the kernel
  when the launcher dies, even by SIGKILL (Linux's parent-death signal). Not SIGTERM: torchrun
  then waits 30 s for each worker, twice, and a stopped or hung worker outlives it all;
- every rank asks for SIGKILL when *its* parent (torchrun) dies: torchrun starts each worker
  in a session of its own, out of reach of a signal to the launcher's process group, and a
  stopped (SIGSTOP) rank acts on nothing but SIGKILL;
- every process of the job inherits a launch token in its environment, so cancelling can find
  and kill whatever is left (a W&B service process, a worker torchrun could not stop) whatever
  process group or session it sits in.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from pathlib import Path

from orchestrator.common.contract import TOKEN_ENV

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` to this process when its parent exits (Linux only; a
    no-op elsewhere). Async-signal-safe enough for a `preexec_fn`."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def tie_rank_to_parent() -> None:
    """Called first thing in every rank: SIGKILL when torchrun (or the launcher) dies. Under
    our launcher, a parent that is already gone (we were re-parented to init before the
    prctl) means the job was cancelled while we started: exit at once."""
    die_with_parent(signal.SIGKILL)
    if os.environ.get(TOKEN_ENV) and os.getppid() == 1:
        os._exit(1)


def processes_with_token(token: str) -> list[int]:
    """PIDs (other than this one) whose environment carries `token`."""
    return processes_with_env(TOKEN_ENV, token)


def processes_with_env(name: str, value: str) -> list[int]:
    """PIDs (other than this one) whose environment holds `name=value`."""
    needle = f"{name}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
    return pids


def kill_token(token: str, grace_s: float = 0.0) -> list[int]:
    """Wait up to `grace_s` for the token's processes to exit, then SIGKILL the rest; return
    the PIDs that had to be killed."""
    deadline = time.monotonic() + grace_s
    while (left := processes_with_token(token)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left
