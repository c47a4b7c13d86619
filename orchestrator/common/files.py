"""Files both sides write: whole-or-nothing writes, and the cache root shared by runs."""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.common.contract import CACHE_ENV


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all (a temporary file renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cache_dir() -> Path:
    """The cache root: prepared data, parameter shapes, JIT-built extensions
    (`$ORCHESTRATOR_CACHE`, else ~/.cache/orchestrator)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                     "orchestrator")
    return Path(root)
