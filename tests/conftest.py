"""Shared test helpers: compose configs the way the CLI does, and run the real CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
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
    return subprocess.run(cli_command(overrides, run_dir), cwd=REPO,
                          env={**os.environ, **(env or {})}, text=True, capture_output=True,
                          timeout=timeout)


def cli_command(overrides: list[str], run_dir: Path) -> list[str]:
    """The command line of `run_cli`: the CLI with `overrides`, into `run_dir`."""
    quoted = str(run_dir).replace("\\", "\\\\").replace("'", "\\'")
    return [sys.executable, "-m", "orchestrator", *overrides, f"hydra.run.dir='{quoted}'",
            "logging.progress=false"]


def run_ok(overrides: list[str], run_dir: Path, env: dict[str, str] | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`run_cli` that must succeed: the test fails with the end of its stderr otherwise."""
    proc = run_cli(overrides, run_dir, env, timeout)
    if proc.returncode != 0:  # the first rank's traceback, then how the launcher ended
        first = proc.stderr.find("Traceback")
        head = proc.stderr[first:first + 4000] + "\n[...]\n" if first >= 0 else ""
        pytest.fail(f"exit code {proc.returncode}\n{head}{proc.stderr[-3000:]}")
    return proc


def free_port() -> int:
    """A TCP port free on this machine right now (for a rendezvous or a MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[str]], Path]:
    """`run_ok(overrides)` once per test session, even across pytest-xdist workers (a file lock
    in the temp root they share): test files that need the same run read one run dir. Tests
    only read it; a failed run is run again (and fails again) for the next test asking."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-runs"
    root.mkdir(exist_ok=True)

    def run(overrides: list[str]) -> Path:
        key = hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:16]
        out, done = root / key, root / f"{key}.done"
        with FileLock(str(root / f"{key}.lock")):
            if not done.exists():
                shutil.rmtree(out, ignore_errors=True)  # an earlier failed attempt
                run_ok(overrides, out)
                done.touch()
        return out

    return run


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


# The test files that take longest under .ci/run, longest first (seconds of one worker on this
# machine kind, measured with --durations=0). pytest-xdist hands out whole files in collection
# order (test.sh: --dist loadfile --no-loadscope-reorder): started first, the long ones cannot
# be the last thing one worker runs while the other idles. Unlisted files follow in their order.
LONGEST_FIRST = [
    "tests/slurm/test_slurm.py",  # 250: the requeue test waits out Slurm's 1-minute limit
    "tests/distributed/test_lifecycle.py",  # 150
    "tests/distributed/test_deepspeed.py",  # 150
    "tests/distributed/test_precision_matrix.py",  # 125
    "tests/distributed/test_resume.py",  # 115
    "tests/distributed/test_lora.py",  # 105
    "tests/distributed/test_runs.py",  # 90
    "tests/distributed/test_strategies.py",  # 90
    "tests/distributed/test_families.py",  # 90 (after test_lifecycle: they share a run)
    "tests/distributed/test_dpo.py",  # 70
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # noqa: ANN201
    """In CI (`CI=true`) a skipped test that CI is meant to run (anything not marked `gpu`)
    fails, naming why it skipped: a check that cannot run must not pass silently."""
    outcome = yield
    report = outcome.get_result()
    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if ci and report.skipped and "gpu" not in item.keywords and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where it must run: {reason}"
