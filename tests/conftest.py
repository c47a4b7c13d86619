"""Shared test helpers: compose configs the way the CLI does, and run the real CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from orchestrator.cli import compose_job  # also registers the structured schema
from orchestrator.config.schema import JobConfig

REPO = Path(__file__).resolve().parents[1]
LOSSES = REPO / "tests" / "assets" / "losses"


def make_job(overrides: list[str] | None = None, run_dir: str = "/nonexistent/run") -> JobConfig:
    """Compose `configs/config.yaml` with `overrides` and convert it like the CLI does."""
    with initialize_config_module("configs", version_base="1.3"):
        cfg = compose("config", overrides=list(overrides or []))
    return compose_job(cfg, run_dir)


def run_cli(overrides: list[str], run_dir: Path, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`python -m orchestrator ...` as a user runs it (real torchrun, real W&B offline)."""
    quoted = str(run_dir).replace("\\", "\\\\").replace("'", "\\'")
    cmd = [sys.executable, "-m", "orchestrator", *overrides, f"hydra.run.dir='{quoted}'",
           "logging.progress=false"]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, text=True,
                          capture_output=True, timeout=timeout)


def run_ok(overrides: list[str], run_dir: Path, env: dict[str, str] | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`run_cli` that must succeed: the test fails with the end of its stderr otherwise."""
    proc = run_cli(overrides, run_dir, env, timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def free_port() -> int:
    """A TCP port free on this machine right now (for a rendezvous or a MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    """A one-rank gloo process group in this process, for code that runs collectives."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def job_factory():
    return make_job
