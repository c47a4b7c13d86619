"""A prepared-data cache directory: its layout, and the rule for writing one. A cache directory
is written only when it is ours (it holds a manifest: a complete earlier preparation) or empty or
absent, the rule run directories follow: a directory the user set as `data.cache_dir` that holds
anything else (their corpus, say) is refused untouched. Torch- and numpy-free: the launcher
checks it before anything is tokenized.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from orchestrator.common.errors import ConfigError

MANIFEST, TOKENS, INDEX = "manifest.json", "tokens.bin", "docs.idx"
KEY = "data.cache_dir"
SOURCE_DIR = re.compile(r"\.?source-\d+(\.lock)?")  # several sources: <cache_dir>/source-<i>


def _listing(entries: list[Path]) -> str:
    names = sorted(e.name + ("/" if e.is_dir() else "") for e in entries)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_cache_dir(path: Path, several: bool = False) -> None:
    """Refuse, in one line, a cache directory this job may not write: a file, one that cannot
    be created or written, or a non-empty one that is not ours. With `several` sources the
    directory holds one `source-<i>` cache per source, each checked alike."""
    if path.exists() and not path.is_dir():
        raise ConfigError(KEY, str(path), "a directory (this is a file)")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(KEY, str(path), f"a directory this user can write ({existing} is "
                          "not writable)")
    if not path.is_dir():
        return
    entries = list(path.iterdir())
    if several:
        foreign = [e for e in entries if not SOURCE_DIR.fullmatch(e.name)]
        for sub in entries:
            if sub.is_dir() and SOURCE_DIR.fullmatch(sub.name):
                check_cache_dir(sub)
    else:
        foreign = [] if (path / MANIFEST).is_file() else entries
    if foreign:
        raise ConfigError(KEY, str(path), "an empty directory, or one this project prepared "
                          f"(this one holds other files: {_listing(foreign)}); nothing was "
                          "written to it")


def remove_stale_tmp(out: Path) -> None:
    """Remove the temporary directories (`.NAME.tmpPID`) a preparation of `out` killed before
    it finished left behind (its process is gone)."""
    for tmp in out.parent.glob(f".{out.name}.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
