"""How one attempt of a run ended, in `<run_dir>/attempt.json`: rank 0 records it
(run/checkpoint/stop.py); the launcher, the Slurm script and the next attempt take it.
{"state": "stopped", "signal", "step", "checkpoint"} or {"state": "finished", "step"}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.common.contract import ATTEMPT_JSON
from orchestrator.common.files import write_atomic


def record_attempt(run_dir: str | Path, info: dict[str, Any]) -> None:
    write_atomic(Path(run_dir) / ATTEMPT_JSON, json.dumps(info, indent=2) + "\n")


def take_attempt(run_dir: str | Path) -> dict[str, Any] | None:
    """How the last attempt ended, removed: None when it recorded nothing (it failed, or has
    not ended)."""
    path = Path(run_dir) / ATTEMPT_JSON
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    path.unlink(missing_ok=True)
    return info
