"""Reading what a run wrote, on either side: the metrics file's records (launcher, reports,
tests) and the W&B run's offline log, through W&B's own reader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from orchestrator.common.contract import WANDB_RUN_JSON


def read_metrics(path: str | os.PathLike[str], events: bool = False) -> list[dict[str, Any]]:
    """The per-step records of metrics.jsonl (with `events=True`: the event records).

    A last line cut off mid-record (a writer killed or out of disk space) is skipped with a
    warning; a corrupt line anywhere else raises ValueError naming `path:line`."""
    with open(path) as f:
        lines = f.read().split("\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):  # no newline after it: the writer stopped mid-record
                warnings.warn(f"{path}:{i}: skipped an incomplete last record ({line[:40]!r})",
                              stacklevel=2)
                break
            raise ValueError(f"{path}:{i}: not a JSON record ({e})") from None
    return [r for r in rows if ("event" in r) == events]


def read_wandb_run(run_dir: str | os.PathLike[str], attempt: str | None = None
                   ) -> list[dict[str, Any]]:
    """The records of a run's offline W&B transaction log, read by W&B's own reader
    (`wandb leet inspect --json`): the latest attempt's, or the one in `attempt` (a resumed
    run writes one offline directory per attempt, all under the same run id)."""
    found = attempt or json.loads((Path(run_dir) / WANDB_RUN_JSON).read_text())["dir"]
    wandb_bin = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb_bin), "leet", "inspect", "--json", found],
                         capture_output=True, text=True, check=True, timeout=120)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
