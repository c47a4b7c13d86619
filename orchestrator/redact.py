"""Secrets never reach a logged config, a plan or a script: anything whose key looks like a
secret is replaced before it is written or logged."""

from __future__ import annotations

import re
from typing import Any

SECRET_KEY = re.compile(
    r"(^|[_.-])(api[_-]?key|key|token|secret|passw(or)?d|credentials?)$", re.IGNORECASE
)
REDACTED = "***REDACTED***"


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(key))


def redact(obj: Any) -> Any:
    """A deep copy of `obj` with the values of secret-looking keys replaced."""
    if isinstance(obj, dict):
        return {k: REDACTED if is_secret_key(str(k)) and v is not None else redact(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj


def redact_override(override: str) -> str:
    """`key=value` from the command line, with the value hidden when the key is a secret."""
    key, sep, _ = override.partition("=")
    leaf = key.lstrip("+~").rsplit(".", 1)[-1]
    return f"{key}{sep}{REDACTED}" if sep and is_secret_key(leaf) else override
