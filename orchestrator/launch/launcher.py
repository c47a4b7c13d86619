"""Launchers turn a `Plan` into processes. Nothing outside this package spawns processes."""

from __future__ import annotations

import shlex
import socket
from typing import Protocol

from orchestrator.common.errors import ConfigError
from orchestrator.common.plan import Plan
from orchestrator.config.schema import JobConfig


class Handle(Protocol):
    def status(self) -> str: ...
    def wait(self) -> int: ...


class Printed:
    """launcher=torchrun on several nodes: the commands are printed for the user to run."""

    def status(self) -> str:
        return "PRINTED"

    def wait(self) -> int:
        return 0


def check_port_free(job: JobConfig) -> None:
    """Preflight for a rendezvous hosted on this machine: its port must be free."""
    if job.launcher.rdzv_host not in ("127.0.0.1", "localhost", socket.gethostname()):
        return
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", job.launcher.rdzv_port))
        except OSError as e:
            raise ConfigError("launcher.rdzv_port", job.launcher.rdzv_port,
                              f"a free port ({e.strerror} here)") from e


def launch(plan: Plan, job: JobConfig) -> Handle:
    name = job.launcher.name
    if name == "slurm":
        from orchestrator.launch.slurm import launch_slurm

        return launch_slurm(plan, job)
    if name == "torchrun" and plan.nnodes > 1:
        check_port_free(job)
        print(f"run on each node (node rank N = 0..{plan.nnodes - 1}):")
        for cmd in plan.commands:
            print("  " + " ".join(f"{k}={shlex.quote(v)}" for k, v in plan.env.items()) + " "
                  + shlex.join(cmd))
        return Printed()
    from orchestrator.common.secrets import secret_env
    from orchestrator.launch.local import launch_local

    return launch_local(plan, secret_env(job))
