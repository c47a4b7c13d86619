"""The run directory: created or adopted by one launch, locked for the life of the run, marked as
ours, and never a silent mix of two runs.

Rules (checked before anything is written):
- a new or empty directory becomes a run dir;
- a directory holding files that are not ours (no marker) is refused;
- one of ours that only holds a plan (`action=plan`) is re-used;
- one of ours where a job was launched is resumed when it holds a complete checkpoint and
  `resume=auto`; otherwise it is refused unless `run.overwrite=true` (then its files are
  deleted first), and always while another launch holds its lock or its Slurm job is live;
- a launch that fails before its job starts leaves nothing behind: the directory it created
  (Hydra creates the output directory before our code runs) is removed again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from orchestrator.common.contract import RUN_LOCK, RUN_MARKER, SLURM_RECORD
from orchestrator.common.errors import ConfigError, OrchestratorError
from orchestrator.common.files import write_atomic
from orchestrator.config.schema import JobConfig

MARKER, LOCK = RUN_MARKER, RUN_LOCK
# Directories created after this moment were created by this process (Hydra makes the output
# directory before calling us); the filesystem's coarse clock may lag time.time() slightly.
PROCESS_START = time.time() - 0.05


class RunDirBusy(OrchestratorError):
    """Another launch (or a live Slurm job) is using the run directory."""


def _clear(path: Path, keep: str | None = None) -> None:
    """Delete everything in `path` (but `keep`); symlinks go, never what they point to."""
    for entry in path.iterdir():
        if entry.name == keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _created_by_us(path: Path) -> bool:
    with contextlib.suppress(OSError):
        return path.stat().st_mtime >= PROCESS_START and not any(path.iterdir())
    return False


_MISSING_AT_START: set[Path] = set()


def note_missing(paths: list[str]) -> None:
    """Before Hydra runs: remember which of `paths` (where run dirs will be made, e.g. `runs`)
    and their parents do not exist yet, so a refused launch can remove the ones Hydra makes."""
    for path in paths:
        p = Path(path).absolute()
        for q in (p, *p.parents):
            if q.exists():
                break
            _MISSING_AT_START.add(q)


def discard_if_unused(path: str | Path) -> None:
    """Remove `path` when this process created it and left it empty (validate, status and
    refused launches write nothing), and the empty parents `note_missing` saw were missing.
    (A directory's time changes whenever an entry is added, so it shows only for the leaf
    whether this process made it.)"""
    p = Path(path).absolute()
    if not _created_by_us(p):
        return
    while p != p.parent and (p == Path(path).absolute() or p in _MISSING_AT_START):
        try:
            p.rmdir()
        except OSError:
            return
        p = p.parent


class RunDir:
    """A run directory held by this launch: `launched()` once the job starts, `release()`
    at the end (the lock goes with the process anyway, even on SIGKILL)."""

    def __init__(self, path: Path, fd: int, created: bool) -> None:
        self.path, self.fd, self.created, self.started = path, fd, created, False
        self.keep = False  # an earlier run's dir adopted to resume it: never discarded

    def write(self, name: str, text: str) -> Path:
        write_atomic(self.path / name, text)
        return self.path / name

    def _mark(self, launched: bool) -> None:
        info = {"launched": launched, "pid": os.getpid(), "host": socket.gethostname(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.write(MARKER, json.dumps(info, indent=2) + "\n")

    def launched(self) -> None:
        self.started = True
        self._mark(launched=True)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1

    def discard(self) -> None:
        """Undo a launch that failed before its job started."""
        self.release()
        if self.keep:
            return
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        _clear(self.path)  # all ours: a foreign directory is never adopted


def lock(path: Path) -> int:
    """Hold `path` for this process (an flock on its lock file, dropped when the process ends);
    RunDirBusy when another process holds it."""
    try:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError("hydra.run.dir", str(path), f"a writable directory ({e.strerror})"
                          ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirBusy(f"run dir {path} is in use by another launch ({holder}); wait for "
                         "it to end or choose another hydra.run.dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def _live_slurm_job(path: Path) -> str | None:
    if not (path / SLURM_RECORD).exists():
        return None
    from orchestrator.launch.slurm_job import SlurmHandle

    with contextlib.suppress(Exception):  # Slurm gone or record unreadable: nothing live
        handle = SlurmHandle.load(path)
        state = handle.status()
        if state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED",
                     "SUSPENDED"):
            return f"Slurm job {handle.job_id} ({state})"
    return None


def _resumable(job: JobConfig, path: Path) -> bool:
    """An earlier run here left a complete checkpoint, and this launch resumes (resume=auto)."""
    from orchestrator.common.checkpoints import complete

    return job.resume == "auto" and not job.run.overwrite and bool(complete(path))


def _listing(entries: list[Path]) -> str:
    names = sorted(e.name + ("/" if e.is_dir() else "") for e in entries)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _refuse_foreign(path: Path) -> None:
    entries = [e for e in path.iterdir() if e.name != LOCK]
    if entries and not (path / MARKER).exists():
        raise ConfigError("hydra.run.dir", str(path), "a new or empty directory, or an "
                          "earlier run dir of ours (this one holds files that are not: "
                          f"{_listing(entries)})")


def open_run_dir(job: JobConfig) -> RunDir:
    """Create or adopt `job.run_dir` for this launch, under the rules in the module docstring."""
    path = Path(job.run_dir)
    existed = path.is_dir() and not _created_by_us(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("hydra.run.dir", str(path), "a directory this user can create "
                          f"({e.strerror})") from None
    marker = path / MARKER
    _refuse_foreign(path)  # before the lock file: a directory not ours is left untouched
    fd = lock(path)
    try:
        if marker.exists() and json.loads(marker.read_text()).get("launched"):
            live = _live_slurm_job(path)
            if live:
                raise RunDirBusy(f"run dir {path} is in use by {live}; cancel it with "
                                 f"`python -m orchestrator action=cancel run_dir={path}` or "
                                 "choose another hydra.run.dir")
            if _resumable(job, path):  # the same run goes on: nothing is deleted
                run_dir = RunDir(path, fd, created=False)
                run_dir.keep = True
                return run_dir
            if not job.run.overwrite:
                raise ConfigError("run.overwrite", False, f"true to replace the earlier run in "
                                  f"{path} (its files are deleted), or another hydra.run.dir")
        _clear(path, keep=LOCK)  # ours: a plan only, or an earlier run the user replaces
        run_dir = RunDir(path, fd, created=not existed)
        run_dir._mark(launched=False)
        return run_dir
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def held(job: JobConfig) -> Iterator[RunDir]:
    """`open_run_dir` for the span of a launch: discarded if it fails before the job starts,
    released when it ends."""
    run_dir = open_run_dir(job)
    try:
        yield run_dir
    except BaseException:
        if not run_dir.started:
            run_dir.discard()
        raise
    finally:
        run_dir.release()


# the default run dir's name (configs/config.yaml: runs/<time>_<launch id>)
DEFAULT_NAME = re.compile(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_[0-9a-f]{6}")


def remove_abandoned(parent: Path, min_age_s: float = 60.0) -> None:
    """Remove the empty run dirs a killed launch left in `parent` (a launch that ends removes
    its own: `discard_if_unused`): only empty ones with the default name, untouched for
    `min_age_s` (a launch starting right now may have just made its own)."""
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            if (DEFAULT_NAME.fullmatch(entry.name) and entry.is_dir()
                    and not entry.is_symlink()
                    and time.time() - entry.stat().st_mtime > min_age_s):
                with contextlib.suppress(OSError):
                    entry.rmdir()  # fails, harmlessly, unless it is empty
