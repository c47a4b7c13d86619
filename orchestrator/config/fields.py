"""Schema field helpers shared by the job's and the launcher's config classes."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def choice(default: Any, *choices: Any) -> Any:
    """A field whose value must be one of `choices` (checked by `validate`)."""
    return field(default=default, metadata={"choices": tuple(choices)})
