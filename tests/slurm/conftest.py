"""The local Slurm cluster the tests submit to: a real controller and two slurmd daemons on this
machine (scripts/start_slurm.sh, which .ci/run's test command starts)."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    out = subprocess.run(["bash", str(REPO / "scripts" / "start_slurm.sh")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    conf = out.stdout.strip().split("=", 1)[1]
    os.environ["SLURM_CONF"] = conf  # for the scontrol calls the tests make themselves
    return {"SLURM_CONF": conf}


def scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True).stdout
