"""The run directory rules (launch/rundir.py), in-process: a directory that is not ours is
refused untouched, a launched run is refused unless run.overwrite, a held one is refused with the
holder's PID, a plan-only one is re-used, and a launch that fails before its job starts leaves
nothing behind."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from orchestrator.cli import execute
from orchestrator.common.errors import ConfigError
from orchestrator.common.files import write_atomic
from orchestrator.config.derived import Hardware
from orchestrator.config.schema import JobConfig, RunConfig
from orchestrator.launch import rundir


def job_in(path: Path, **changes: object) -> JobConfig:
    return dataclasses.replace(JobConfig(), run_dir=str(path), **changes)


def test_a_directory_that_is_not_ours_is_refused_and_left_untouched(tmp_path: Path) -> None:
    user = tmp_path / "p"
    (user / "model").mkdir(parents=True)
    (user / "model" / "important.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"hydra.run.dir.*not: model/"):
        rundir.open_run_dir(job_in(user))
    assert sorted(p.name for p in user.rglob("*")) == ["important.txt", "model"]


def test_a_launched_run_is_refused_unless_overwrite(tmp_path: Path) -> None:
    run = rundir.open_run_dir(job_in(tmp_path / "r"))
    run.write("metrics.jsonl", '{"step": 1}\n')
    run.launched()
    run.release()
    with pytest.raises(ConfigError, match=r"'run.overwrite' has value False"):
        rundir.open_run_dir(job_in(tmp_path / "r"))
    assert (tmp_path / "r" / "metrics.jsonl").exists()
    again = rundir.open_run_dir(job_in(tmp_path / "r", run=RunConfig(overwrite=True)))
    again.release()
    names = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert names == [rundir.LOCK, rundir.MARKER]  # the earlier run's files are gone
    assert json.loads((tmp_path / "r" / rundir.MARKER).read_text())["launched"] is False


def test_a_held_run_dir_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    import os

    held = rundir.open_run_dir(job_in(tmp_path / "r"))
    try:
        with pytest.raises(rundir.RunDirBusy, match=rf"in use by another launch \(PID "
                                                      rf"{os.getpid()} on "):
            rundir.open_run_dir(job_in(tmp_path / "r", run=RunConfig(overwrite=True)))
    finally:
        held.release()
    rundir.open_run_dir(job_in(tmp_path / "r")).release()  # free again once released


def test_a_plan_only_dir_is_reused(tmp_path: Path) -> None:
    first = rundir.open_run_dir(job_in(tmp_path / "r"))
    first.write("plan.json", "{}")
    first.release()
    second = rundir.open_run_dir(job_in(tmp_path / "r"))
    second.release()
    assert not (tmp_path / "r" / "plan.json").exists()


def test_a_failed_launch_removes_the_dir_it_created(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # as in a launcher process: what exists when it starts (tmp_path) was not made by it
    monkeypatch.setattr(rundir, "PROCESS_START", time.time())
    with pytest.raises(RuntimeError, match="boom"), rundir.held(job_in(tmp_path / "a" / "r")) \
            as run:
        run.write("config.yaml", "x: 1\n")
        raise RuntimeError("boom")
    assert not (tmp_path / "a" / "r").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    monkeypatch.setattr(rundir, "PROCESS_START", kept.stat().st_mtime + 1)
    with pytest.raises(RuntimeError), rundir.held(job_in(kept)):  # an empty directory that
        raise RuntimeError("boom")  # was there before the launch stays
    assert kept.is_dir() and not any(kept.iterdir())


def test_plan_into_a_users_directory_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    job = job_in(tmp_path, action="plan")
    with pytest.raises(ConfigError, match="notes.txt"):
        execute(job, Hardware())
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_write_atomic_replaces_whole(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    target.write_text("old")
    write_atomic(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temporary left


def test_ranks_refuse_a_config_their_launch_did_not_write(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from orchestrator.common.contract import CONFIG_SHA_ENV
    from orchestrator.config.load import config_text, load_job

    text = config_text(job_in(tmp_path))
    (tmp_path / "config.yaml").write_text(text)
    monkeypatch.setenv(CONFIG_SHA_ENV, hashlib.sha256(text.encode()).hexdigest())
    assert load_job(tmp_path / "config.yaml").run_dir == str(tmp_path)
    (tmp_path / "config.yaml").write_text(text.replace("steps: 20", "steps: 21"))
    with pytest.raises(ConfigError, match="changed after the launch"):
        load_job(tmp_path / "config.yaml")


def test_a_run_with_a_checkpoint_is_resumed_not_refused(tmp_path: Path) -> None:
    run = rundir.open_run_dir(job_in(tmp_path / "r"))
    run.write("metrics.jsonl", '{"step": 1}\n')
    (tmp_path / "r" / "checkpoints" / "step-00000004").mkdir(parents=True)
    (tmp_path / "r" / "checkpoints" / "step-00000004" / "meta.json").write_text('{"step": 4}')
    run.launched()
    run.release()
    with pytest.raises(ConfigError, match="run.overwrite"):  # resume=never: a fresh start
        rundir.open_run_dir(job_in(tmp_path / "r", resume="never"))
    adopted = rundir.open_run_dir(job_in(tmp_path / "r"))  # resume=auto
    adopted.discard()  # a resumed run's launch failing never deletes the run
    assert (tmp_path / "r" / "metrics.jsonl").exists()
    assert (tmp_path / "r" / "checkpoints" / "step-00000004" / "meta.json").exists()
