"""Secrets never reach a logged config, a plan, a script or an error message: anything whose key
looks like a secret is replaced before it is written, printed or logged.

Ranks still need the real values (DeepSpeed's comet monitor needs its api_key): they travel only
through the process environment. The launcher adds `secret_env(job)` to the ranks' environment
(`ORCHESTRATOR_SECRETS`, a JSON list of `[path, value]` pairs), and `config.load.load_job` puts them
back into the redacted `config.yaml` it reads (`restore`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any, Union

from orchestrator.common.contract import SECRETS_ENV

SECRET_KEY = re.compile(
    r"(^|[_.-])(api[_-]?key|key|token|secret|passw(or)?d|credentials?)$", re.IGNORECASE
)
REDACTED = "***REDACTED***"
ENV_VAR = SECRETS_ENV

PathPart = Union[str, int]  # a mapping key, or a list index


def is_secret_key(key: str) -> bool:
    """Whether `key` (a leaf name or a dotted/indexed key such as `a.b.api_key` or `x[0]`)
    names a secret."""
    return bool(SECRET_KEY.search(re.sub(r"(\[\d+\])+$", "", str(key))))


def redact(obj: Any) -> Any:
    """A deep copy of `obj` with the values of secret-looking keys replaced."""
    if isinstance(obj, Mapping):
        return {k: REDACTED if is_secret_key(str(k)) and v is not None else redact(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj


def redact_value(key: str, value: Any) -> Any:
    """`value` as it may be shown under `key`: hidden when the key is a secret, else with the
    secrets inside it (a mapping or list) hidden."""
    if is_secret_key(key) and value is not None:
        return REDACTED
    return redact(value)


def redact_override(override: str) -> str:
    """`key=value` from the command line, with the value hidden when the key is a secret."""
    key, sep, _ = override.partition("=")
    leaf = key.lstrip("+~").rsplit(".", 1)[-1]
    return f"{key}{sep}{REDACTED}" if sep and is_secret_key(leaf) else override


def find_secrets(obj: Any, path: tuple[PathPart, ...] = ()) -> list[tuple[list[PathPart], Any]]:
    """Every secret in `obj` as ([key or index, ...], value): what `redact` hides."""
    found: list[tuple[list[PathPart], Any]] = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if is_secret_key(str(k)) and v is not None:
                found.append(([*path, k], v))
            else:
                found += find_secrets(v, (*path, k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found += find_secrets(v, (*path, i))
    return found


def secret_values(obj: Any) -> list[str]:
    """The secret values in `obj` as the strings they would print as (for `scrub`)."""
    out: list[str] = []
    for _, value in find_secrets(obj):
        if isinstance(value, (Mapping, list, tuple)):
            out += [str(v) for v in _leaves(value)]
        out.append(str(value))
    return sorted({v for v in out if v and v != REDACTED}, key=len, reverse=True)


def _leaves(obj: Any) -> list[Any]:
    if isinstance(obj, Mapping):
        return [x for v in obj.values() for x in _leaves(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in _leaves(v)]
    return [obj] if obj is not None and not isinstance(obj, bool) else []


def scrub(text: str, values: list[str]) -> str:
    """`text` (an error message, a log line) with each of the secret `values` replaced."""
    for value in values:
        if len(value) >= 3:  # a one- or two-character "secret" would mangle the whole text
            text = text.replace(value, REDACTED)
    return text


def restore(data: Any, pairs: list[tuple[list[PathPart], Any]] | list[list[Any]]) -> Any:
    """Put the secret values back where `data` (a redacted config) holds REDACTED. A path that
    `data` does not hold, or holds with another value, is left alone."""
    for path, value in pairs:
        node = data
        try:
            for part in path[:-1]:
                node = node[part]
            if node[path[-1]] == REDACTED:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    return data


def secret_env(job: Any) -> dict[str, str]:
    """The environment the ranks of `job` need for their secrets: {ENV_VAR: JSON} (empty when
    there are none). Launchers add it to the ranks' environment, never to a file."""
    pairs = find_secrets(dataclasses.asdict(job))
    return {ENV_VAR: json.dumps(pairs)} if pairs else {}


def env_secrets(environ: Mapping[str, str] | None = None) -> list[list[Any]]:
    """The secrets the launcher passed in the environment (see `secret_env`)."""
    raw = (os.environ if environ is None else environ).get(ENV_VAR)
    if not raw:
        return []
    try:
        pairs = json.loads(raw)
    except json.JSONDecodeError:
        return []
    return [p for p in pairs if isinstance(p, list) and len(p) == 2 and isinstance(p[0], list)
            and p[0]] if isinstance(pairs, list) else []
