"""A run's checkpoints on disk, as both sides see them: the layout, the committed ones, and
whether one is whole and safe to read. Torch-free, so the launcher checks a checkpoint before
any process starts; the ranks save and load them (orchestrator/run/checkpoint/periodic.py).

Layout: `<run_dir>/checkpoints/step-<8 digits>/` holds DCP's shards and index (`.metadata`),
`meta.json` (step, files and sizes, written last: the commit) and the run's `config.yaml`.
"""

from __future__ import annotations

import enum
import json
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.common.contract import CONFIG_YAML
from orchestrator.common.errors import OrchestratorError

ROOT = "checkpoints"
META = "meta.json"
CONFIG = CONFIG_YAML
PREFIX = "step-"


class CheckpointError(OrchestratorError):
    """A checkpoint that cannot be used (missing, incomplete, corrupt or from another job)."""


def step_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def complete(run_dir: str | Path) -> list[Path]:
    """The committed checkpoints of a run, oldest first."""
    root = Path(run_dir) / ROOT
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / META).is_file()]
    return sorted(found, key=lambda p: p.name)


@dataclass(frozen=True)
class Resume:
    path: Path
    step: int
    meta: dict[str, Any]


def find(resume: str, run_dir: str | Path) -> Resume | None:
    """The checkpoint a run continues from (`resume`: the job's `resume` key): `auto` the
    newest complete one in `run_dir` that passes `verify` (a damaged newer one is skipped with
    a warning; None when there is none; a `CheckpointError` when every one is damaged),
    `never` none, else the given directory, which must pass."""
    if resume == "never":
        return None
    if resume != "auto":
        return read(Path(resume), resume)
    found = complete(run_dir)
    for path in reversed(found):
        try:
            return read(path, "auto")
        except CheckpointError as e:
            print(f"warning: {e}; trying the previous checkpoint", file=sys.stderr, flush=True)
    if found:  # starting afresh here would mix two runs in one directory
        raise CheckpointError(f"resume=auto: every checkpoint in {Path(run_dir) / ROOT} is "
                              "damaged (see the warnings above); resume=never "
                              "run.overwrite=true starts this run dir afresh, or resume=PATH "
                              "names a checkpoint to continue from")
    return None


class _MetadataOnly(pickle.Unpickler):
    """DCP keeps its index (`.metadata`) as a pickle. Only its own plain classes may appear
    in one: anything else (e.g. `os.system`) is refused instead of called."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self._classes: list[type] = []  # the classes this index named, all allowed below

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "getattr"):
            return self._enum_member
        found = super().find_class(module, name) if module.startswith("torch") or \
            module in ("pathlib", "collections") else None
        dcp_class = module.startswith("torch.distributed.checkpoint.") and \
            isinstance(found, type)  # its data classes, never one of its functions
        if not (dcp_class or (module == "torch" and name in ("Size", *_dtypes()))
                or (module, name) in SAFE_NAMES):
            raise pickle.UnpicklingError(f"refused {module}.{name}")
        if isinstance(found, type):
            self._classes.append(found)
        return found

    def _enum_member(self, cls: Any, name: Any) -> Any:
        """Some interpreters (Debian 12's Python 3.11.2) pickle an `Enum` member as
        `getattr(EnumClass, "NAME")`, and DCP's index holds enums: look up exactly a member of
        an enum class this index already named through `find_class`, nothing else."""
        if any(cls is c for c in self._classes) and issubclass(cls, enum.Enum) \
                and isinstance(name, str) and name in cls.__members__:
            return cls[name]
        raise pickle.UnpicklingError(f"refused builtins.getattr({cls!r}, {name!r})")


SAFE_NAMES = {("collections", "OrderedDict"), ("pathlib", "PosixPath"),
              ("torch.serialization", "_get_layout")}  # a layout by its name


def _dtypes() -> tuple[str, ...]:
    """torch's dtype names (torch is imported only to read a checkpoint's index)."""
    import torch

    return tuple(n for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype))


def verify(path: Path, meta: dict[str, Any]) -> None:
    """Every file the commit recorded is there at its recorded size, and DCP's pickled index
    holds nothing but DCP's own classes (so loading it cannot run code)."""
    for name, size in meta.get("files", {}).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            got = f.stat().st_size if f.is_file() else "missing"
            raise CheckpointError(f"checkpoint file {f} is damaged ({got} bytes, "
                                  f"{size} when saved)")
    index = path / ".metadata"
    if index.is_file():
        try:
            with open(index, "rb") as fh:
                _MetadataOnly(fh).load()
        except Exception as e:  # noqa: BLE001 - any failure: not DCP's own index
            raise CheckpointError(f"checkpoint file {index} is not a plain DCP index ({e})"
                                  ) from None


def read(path: Path, how: str) -> Resume:
    """The committed checkpoint at `path` (checked by `verify`); `how` names the caller."""
    meta_file = path / META
    if not meta_file.is_file():
        raise CheckpointError(f"resume={how}: {path} is not a complete checkpoint (no "
                              f"{META}); complete ones: {[p.name for p in complete(path.parent)]}")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"resume={how}: cannot read {meta_file}: {e}") from None
    verify(path, meta)
    return Resume(path, int(meta["step"]), meta)
