"""The training loop's clock and host syncs: time is taken after the device has finished, the
host waits for the device only on logged steps, and peak memory is per logged interval."""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest
import torch

from orchestrator.run import loop
from orchestrator.run.metrics import NullLogger
from orchestrator.run.strategies.base import Engine
from tests.conftest import make_job


def test_interval_timer_counts_work_the_device_finishes_after_the_step_returns() -> None:
    """A step that only queues its work (as CUDA kernels and NCCL collectives do) returns at
    once; the time must still include the work, because `close` syncs first."""
    for synced in (True, False):
        worker = threading.Thread(target=time.sleep, args=(0.3,))  # the "device"
        timer = loop.IntervalTimer(worker.join if synced else lambda: None)
        worker.start()
        timer.tick()
        elapsed, steps = timer.close()
        worker.join()
        assert steps == 1
        # without the sync point the clock stops before the work is done
        assert (elapsed >= 0.3) if synced else (elapsed < 0.3)


class CountingEngine(Engine):
    """An engine whose step returns its call number as the loss (no model work)."""

    def __init__(self) -> None:
        model = torch.nn.Linear(1, 1)
        super().__init__(model, torch.optim.SGD(model.parameters(), lr=0.1),
                         make_job([]), "cpu")
        self.calls = 0

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        self.calls += 1
        return torch.tensor(float(self.calls))


class Recorder(NullLogger):
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append((step, metrics))


def test_host_waits_for_the_device_only_on_logged_steps(one_rank_group, monkeypatch) -> None:
    syncs: list[str] = []
    monkeypatch.setattr(loop, "device_sync", syncs.append)
    job = make_job(["train.steps=10", "train.log_every=4", "optim.warmup_steps=0"])
    logger = Recorder()
    losses = loop.train(loop.Training(CountingEngine(), job, logger, 1, 8), itertools.repeat({}))
    assert losses == [float(i) for i in range(1, 11)]  # every step's loss is still returned
    assert [step for step, _ in logger.rows] == [4, 8, 10]
    assert len(syncs) == 3
    assert [m["loss"] for _, m in logger.rows] == [4.0, 8.0, 10.0]
    assert all(m["step_time_s"] > 0 for _, m in logger.rows)


def test_peak_memory_is_reset_per_interval() -> None:
    loop.reset_peak_memory("cpu")
    block = np.ones(40_000_000)  # 320 MB, touched
    high = loop.peak_memory_bytes("cpu")
    del block
    loop.reset_peak_memory("cpu")
    low = loop.peak_memory_bytes("cpu")
    assert high - low > 250e6, (high, low)


class NaNEngine(CountingEngine):
    """Counts like CountingEngine, but its loss is NaN from step `nan_from` on."""

    def __init__(self, nan_from: int) -> None:
        super().__init__()
        self.nan_from = nan_from

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        loss = super().train_step(micro_batches)
        return torch.tensor(float("nan")) if self.calls >= self.nan_from else loss


def test_nonfinite_loss_stops_training_at_the_first_logged_step(one_rank_group) -> None:
    job = make_job(["train.steps=12", "train.log_every=4", "optim.warmup_steps=0"])
    assert job.train.stop_on_nonfinite  # the default
    engine, logger = NaNEngine(nan_from=6), Recorder()
    with pytest.raises(loop.NonFiniteLoss) as e:
        loop.train(loop.Training(engine, job, logger, 1, 8), itertools.repeat({}))
    assert str(e.value) == ("loss became nan at step 6 (train.stop_on_nonfinite=true; lower "
                            "optim.lr or check the data)")
    assert engine.calls == 8  # found where the interval 5..8 is all-reduced, not later
    assert [step for step, _ in logger.rows] == [4]  # the NaN interval is not logged


def test_infinite_loss_is_named_too() -> None:
    with pytest.raises(loop.NonFiniteLoss, match="^loss became inf at step 3 "):
        loop.check_finite([1.0, 2.0, float("inf"), float("nan")], last_step=4)
    loop.check_finite([1.0, 2.0], last_step=2)


def test_nonfinite_loss_trains_on_when_the_stop_is_off(one_rank_group) -> None:
    job = make_job(["train.steps=12", "train.log_every=4", "optim.warmup_steps=0",
                    "train.stop_on_nonfinite=false"])
    engine, logger = NaNEngine(nan_from=6), Recorder()
    losses = loop.train(loop.Training(engine, job, logger, 1, 8), itertools.repeat({}))
    assert engine.calls == 12 and [step for step, _ in logger.rows] == [4, 8, 12]
    assert losses[:5] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert all(np.isnan(x) for x in losses[5:])
