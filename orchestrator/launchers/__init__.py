"""Launchers turn a `Plan` into processes. Nothing outside this package spawns processes."""

from __future__ import annotations

from orchestrator.launchers.local import LocalHandle, launch_local
from orchestrator.plan import Plan


def launch(plan: Plan, launcher: str) -> LocalHandle:
    if launcher == "local":
        return launch_local(plan)
    raise ValueError(f"unknown launcher {launcher!r}")  # validate() rejects this first
