"""Finding the checkpoint a run resumes from, checking it is whole and safe to read, and
checking a launch's config against it: everything the launcher needs before any process starts,
so it imports no torch (`periodic.py` saves and loads checkpoints inside the ranks).

Layout: see `periodic.py`.
"""

from __future__ import annotations

import enum
import json
import pickle
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError
from orchestrator.schema import JobConfig

ROOT = "checkpoints"
META = "meta.json"
CONFIG = "config.yaml"
PREFIX = "step-"
# What a resumed run may not change: the shapes and meaning of the saved state and the data
# stream. Anything else (lr, steps, logging, world size and micro batch at the same global
# batch, the torch strategy) may change.
FIXED = ("model", "lora", "objective", "data.name", "data.path", "data.seq_len",
         "data.tokenizer", "data.tokenizer_path", "data.sources", "data.text_field",
         "data.on_error", "data.chat_template", "data.num_samples", "data.branching",
         "data.shuffle", "eval.holdout", "train.seed", "train.global_batch_size",
         "precision.name", "precision.qat", "parallelism.backend")


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


def to_resume(job: JobConfig) -> Resume | None:
    """The checkpoint this run continues from: `resume=auto` the newest complete one in the
    run dir that passes `verify` (a damaged newer one is skipped with a warning; None when
    there is none), `never` none, else the given directory, which must pass."""
    if job.resume == "never":
        return None
    if job.resume != "auto":
        return read(Path(job.resume), job.resume)
    for path in reversed(complete(job.run_dir)):
        try:
            return read(path, "auto")
        except CheckpointError as e:
            print(f"warning: {e}; trying the previous checkpoint", file=sys.stderr, flush=True)
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


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def _differences(now: Any, saved: Any, key: str) -> Iterator[tuple[str, Any, Any]]:
    """The leaf keys under `key` whose values differ, with both values, in key order."""
    if isinstance(now, dict) and isinstance(saved, dict):
        for k in sorted(set(now) | set(saved)):
            yield from _differences(now.get(k), saved.get(k), f"{key}.{k}" if key else k)
    elif now != saved:
        yield key, now, saved


# set per launch, never a change of the run
PER_LAUNCH = ("run_dir", "resume", "action", "step", "run.overwrite")


def _configs(job: JobConfig, resume: Resume) -> tuple[dict[str, Any], dict[str, Any]]:
    """(this launch's config, the checkpoint's), both redacted, with the global batch."""
    import yaml

    from orchestrator.redact import redact
    from orchestrator.typed import to_dict
    from orchestrator.validate import resolve_batch

    try:
        saved = yaml.safe_load((resume.path / CONFIG).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"cannot read {resume.path / CONFIG}: {e}") from None
    now = redact(to_dict(job))
    now["train"]["global_batch_size"] = resolve_batch(job)[1]
    saved["train"]["global_batch_size"] = int(resume.meta.get("global_batch_size", 0)) or \
        saved["train"]["global_batch_size"]
    return now, saved


def changes(job: JobConfig, resume: Resume) -> dict[str, list[Any]]:
    """What this launch changes of the run it resumes: {key: [saved, now]} (per-launch keys
    such as run_dir left out)."""
    return _changed(*_configs(job, resume))


def _changed(now: dict[str, Any], saved: dict[str, Any]) -> dict[str, list[Any]]:
    return {key: [before, value] for key, value, before in _differences(now, saved, "")
            if not any(key == k or key.startswith(f"{k}.") for k in PER_LAUNCH)}


def check_compatible(job: JobConfig, resume: Resume) -> dict[str, list[Any]]:
    """Before launch: refuse to resume `resume` with a config that changes what it saved (the
    first differing key is named); return the harmless changes (`changes`)."""
    from orchestrator.errors import ConfigError

    now, saved = _configs(job, resume)
    for key in FIXED:
        found = next(_differences(_get(now, key), _get(saved, key), key), None)
        if found:
            leaf, value, before = found
            raise ConfigError(leaf, value, f"{before!r} as in the checkpoint {resume.path} "
                              "(resume=never, or another run dir, starts fresh)")
    return _changed(now, saved)
