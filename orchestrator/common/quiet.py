"""Library log lines that say nothing to a user of this project."""

from __future__ import annotations

import logging


def quiet_torchao() -> None:
    """Silence what importing torchao logs on a CPU machine: its PyPI wheel is a CUDA build
    whose two C++ extensions fail to load against a CPU torch (int8 PTQ needs neither), and it
    registers Enums with torch's pytree the way torch 2.13 calls deprecated. transformers
    imports torchao whenever it is installed, so this runs with the package, in every process."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)

