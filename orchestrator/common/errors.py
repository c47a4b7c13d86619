"""The exceptions users see. The CLI prints them as one line, without a traceback."""

from __future__ import annotations

from typing import Any

from orchestrator.common.secrets import redact_value


class OrchestratorError(Exception):
    """An error caused by the user's config or environment, not by a bug."""


class ConfigError(OrchestratorError):
    """A config value that is not allowed: names the key, the value and what is allowed.

    The value is redacted (`secrets.redact_value`) before it is kept or shown: a secret-named key
    shows no value, and a mapping or list shows none of the secrets inside it."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        value = redact_value(key, value)
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config key '{key}' has value {value!r}; allowed: {allowed}")


class DataError(OrchestratorError):
    """A data source the job cannot use, found before launch: the message names the file and
    the line (or row) of the first bad record."""


class LaunchError(OrchestratorError):
    """The job was launched but did not finish successfully."""
