"""The GPU table: device names and reported memory map to table keys; the planner prefers the
local device's own `total_memory` when it is the GPU being planned for."""

from __future__ import annotations

import pytest

from orchestrator.config.gpus import GPUS, GiB, device_memory_bytes, match


@pytest.mark.parametrize(("name", "total", "key"), [
    ("NVIDIA H100 80GB HBM3", 85_000_000_000, "h100"),
    ("NVIDIA H100 PCIe", 85_000_000_000, "h100_pcie"),
    ("NVIDIA H200", 150_000_000_000, "h200"),
    ("NVIDIA A100-SXM4-40GB", 42_500_000_000, "a100_40gb"),
    ("NVIDIA A100-SXM4-80GB", 85_000_000_000, "a100_80gb"),
    ("NVIDIA A100-PCIE-40GB", 42_500_000_000, "a100_40gb"),
    ("NVIDIA A100 80GB PCIe", 85_000_000_000, "a100_80gb"),
    ("Tesla V100-SXM2-32GB", 34_000_000_000, "v100"),
    ("NVIDIA L4", 24_000_000_000, "l4"),
    # GH200 (96 or 144 GB, Grace Hopper) is not an H200 although its name contains one
    ("NVIDIA GH200 480GB", 102_000_000_000, None),
    ("NVIDIA GH200 144G HBM3e", 150_000_000_000, None),
    ("NVIDIA H100 NVL", 100_000_000_000, None),
    ("NVIDIA RTX 6000 Ada Generation", 51_000_000_000, None),
])
def test_match(name: str, total: int, key: str | None) -> None:
    assert match(name, total) == key


def test_table_memory_is_gib_sized_like_the_devices_report() -> None:
    # an "80 GB" H100 reports about 85e9 bytes, a "141 GB" H200 about 150e9
    assert GPUS["h100"].memory_bytes == 80 * GiB == pytest.approx(85e9, rel=0.02)
    assert GPUS["h200"].memory_bytes == 141 * GiB == pytest.approx(150e9, rel=0.02)
    assert GPUS["a100_40gb"].memory_bytes == 40 * GiB


def test_device_memory_prefers_the_detected_device_of_that_kind() -> None:
    h100 = ("NVIDIA H100 80GB HBM3", 85_520_000_000)
    assert device_memory_bytes("h100", detected=h100) == 85_520_000_000
    # another kind of device here (or none): the table's figure for the planned GPU
    assert device_memory_bytes("h200", detected=h100) == GPUS["h200"].memory_bytes
    assert device_memory_bytes("h100", detected=None) == GPUS["h100"].memory_bytes
    gh200 = ("NVIDIA GH200 480GB", 102_000_000_000)
    assert device_memory_bytes("h200", detected=gh200) == GPUS["h200"].memory_bytes
    assert device_memory_bytes("none", detected=h100) is None
    # an A100 40GB host planning an 80 GB job keeps the table's 80 GiB
    assert device_memory_bytes("a100_80gb", detected=("NVIDIA A100-SXM4-40GB", 42_500_000_000)) \
        == GPUS["a100_80gb"].memory_bytes


def test_plan_prefers_the_detected_device_only_on_the_machine_itself(monkeypatch) -> None:
    """launcher=local plans for this machine; a remote launcher's target is not this host."""
    from orchestrator.config import gpus
    from orchestrator.planning.plan import make_plan
    from tests.conftest import make_job

    monkeypatch.setattr(gpus, "detected_device", lambda: ("NVIDIA H100 80GB HBM3", 85_520_000_000))
    local = make_plan(make_job(["cluster.gpu=h100", "launcher=local", "action=plan"]), "cuda", 2)
    assert local.device_memory_bytes == 85_520_000_000
    remote = make_plan(make_job(["cluster.gpu=h100", "launcher=torchrun", "action=plan"]),
                       "cuda", 2)
    assert remote.device_memory_bytes == GPUS["h100"].memory_bytes
    other = make_plan(make_job(["cluster.gpu=h200", "launcher=local", "action=plan"]), "cuda", 2)
    assert other.device_memory_bytes == GPUS["h200"].memory_bytes
