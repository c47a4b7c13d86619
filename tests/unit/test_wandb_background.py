"""W&B starts in the background (issue 14): the rank-0 logger returns before `wandb.init` is done,
and what is logged meanwhile reaches the real offline W&B run, in order. `wandb.init` is the real
one; the test only holds it back until the records are logged."""

from __future__ import annotations

import json
import threading

import pytest
import wandb

from orchestrator.common.records import read_metrics, read_wandb_run
from orchestrator.run.metrics import MetricsLogger
from tests.conftest import make_job

JOB = ["model=gpt2_tiny", "logging.wandb.mode=offline", "logging.progress=false",
       "train.steps=5"]


def test_records_logged_before_wandb_is_up_reach_the_run_in_order(tmp_path, monkeypatch) -> None:
    gate, threads = threading.Event(), []
    real_init = wandb.init

    def held_init(*args, **kwargs):  # the real wandb.init, once the gate opens
        threads.append(threading.current_thread().name)
        assert gate.wait(timeout=60), "wandb.init was never released"
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", held_init)
    logger = MetricsLogger(make_job(JOB, run_dir=str(tmp_path)))
    # the constructor returned with wandb.init still held: it runs on another thread, and the
    # logger knows its W&B run is not up
    assert logger.wandb is not None and not logger.wandb.ready()
    for step in (1, 2, 3):
        logger.log(step, {"loss": 4.0 - step})
    logger.event("start", {"world_size": 2})
    assert not (tmp_path / "wandb_run.json").exists()  # written once the run is up
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    gate.set()
    assert logger.wandb_id() == json.loads((tmp_path / "wandb_run.json").read_text())["id"]
    for step in (4, 5):
        logger.log(step, {"loss": 4.0 - step})
    logger.close()
    assert threads == ["wandb-init"]
    records = read_wandb_run(tmp_path)
    history = [(int(r["history"]["step"]["num"]), r["history"]["item"]["loss"])
               for r in records if r["type"] == "history"]
    assert history == [(s, pytest.approx(4.0 - s)) for s in range(1, 6)]


def test_an_error_of_wandb_init_is_raised_on_the_callers_thread(tmp_path) -> None:
    """A real failure of wandb.init (a resumed run whose recorded id W&B refuses) surfaces at
    the next call on the caller's thread; a run that failed anyway closes without it."""
    (tmp_path / "wandb_run.json").write_text(json.dumps({"id": "bad/id"}))
    logger = MetricsLogger(make_job(JOB, run_dir=str(tmp_path)), resume_step=0)
    with pytest.raises(wandb.errors.UsageError, match="Run ID cannot contain"):
        logger.wandb_id()
    logger.close(failed=True)  # a failed run reports its own error, not W&B's
    assert read_metrics(tmp_path / "metrics.jsonl") == []
