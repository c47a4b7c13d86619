"""Strict conversion of a composed config (mapping) into the typed `JobConfig` tree.

Unknown keys (including typos added with Hydra's `+key=value`) and wrong types are errors that
name the full key, the bad value and what is allowed. Done once at the entry point and again
when a rank reads the run directory's `config.yaml`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from orchestrator.common.contract import CONFIG_SHA_ENV, CONFIG_YAML, metrics_path
from orchestrator.common.errors import ConfigError
from orchestrator.common.secrets import env_secrets, redact, restore
from orchestrator.config.host_schema import LoggingConfig
from orchestrator.config.schema import JobConfig

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, "a list")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, value, "a mapping")
        return copy.deepcopy(dict(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(key, value, f"a mapping of {tp.__name__} fields")
        return from_mapping(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, value, "true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, value, "an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(key, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, value, "a string")
    raise TypeError(f"schema type {_type_name(tp)} at {key} is not supported")


def from_mapping(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        bad = unknown[0]
        raise ConfigError(f"{prefix}{bad}", data[bad], "one of the known keys: " + ", ".join(names))
    kwargs = {name: _convert(data[name], hints[name], f"{prefix}{name}") for name in data}
    return cls(**kwargs)


def to_job(data: Mapping[str, Any], run_dir: str | None = None) -> JobConfig:
    """The composed config (plain mapping) as a `JobConfig`; `run_dir` overrides the stored one."""
    job = from_mapping(JobConfig, data)
    if run_dir is not None:
        job = dataclasses.replace(job, run_dir=str(run_dir))
    return job


def to_dict(job: Any) -> dict[str, Any]:
    return dataclasses.asdict(job)




def load_job(path: str | Path) -> JobConfig:
    """Read a run directory's `config.yaml` (secrets redacted) back into a `JobConfig`, with the
    secrets the launcher passed in this process's environment put back (`secret_env`).
    Under a launch, the file must be the one that launch wrote (its SHA-256 is in the env)."""
    text = Path(path).read_text()
    want = os.environ.get(CONFIG_SHA_ENV)
    if want and hashlib.sha256(text.encode()).hexdigest() != want:
        raise ConfigError("config.yaml", str(path), "the file this launch wrote: it changed "
                          "after the launch (another launch into the same run dir?)")
    data = yaml.safe_load(text)
    return to_job(restore(data, env_secrets()))


def metrics_file_of(run_dir: str | Path) -> Path:
    """The metrics file of the run in `run_dir`: the `logging.metrics_file` its config.yaml
    names (the schema's default for a run dir without one)."""
    default = LoggingConfig().metrics_file
    try:
        saved = yaml.safe_load((Path(run_dir) / CONFIG_YAML).read_text())
        name = saved["logging"]["metrics_file"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        name = default
    return metrics_path(run_dir, name if isinstance(name, str) and name else default)


def config_text(job: JobConfig) -> str:
    """The resolved config with secrets redacted, as config.yaml holds it; ranks read it back."""
    return yaml.safe_dump(redact(to_dict(job)), sort_keys=False)
