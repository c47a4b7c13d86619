"""The per-rank programs' (recipes') entry: a run that stops on a condition of the user's data or
environment (disk full, a non-finite loss, a config error) prints one line `error: <message>` and
exits 1 without a traceback; any other exception is a bug and keeps its traceback. The recipe's
own clean-up (logger close, process-group shutdown) runs inside `body`, before this sees the
error."""

from __future__ import annotations

import sys
from collections.abc import Callable

from orchestrator.common.errors import OrchestratorError
from orchestrator.run.checkpoint.stop import Stopped
from orchestrator.run.distributed import describe_timeout, is_timeout
from orchestrator.run.loop import NonFiniteLoss
from orchestrator.run.metrics import NO_SPACE

# the exception types that stop a run for a reason the user must fix, not a bug
USER_ERRORS: tuple[type[BaseException], ...] = (OrchestratorError, NonFiniteLoss)


def run_rank(body: Callable[[], object]) -> int:
    """Run `body` (one rank's whole program); the process exit code: 0 (also after a stop on
    the stop signal, checkpoint saved), or 1 after a one-line error for a user-facing
    condition. A disk-full OSError from code that does not name its file (a library's write)
    counts as one too."""
    try:
        body()
    except Stopped:  # on the stop signal, after the checkpoint: rank 0 has said so
        return 0
    except USER_ERRORS as e:
        _say(str(e) or type(e).__name__)
        return 1
    except RuntimeError as e:
        if not is_timeout(e):
            raise
        _say(describe_timeout(e))
        return 1
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        _say(f"disk full ({e.strerror}" + (f": {e.filename})" if e.filename else ")"))
        return 1
    return 0


def _say(message: str) -> None:
    print("error: " + " ".join(message.splitlines()), file=sys.stderr, flush=True)
