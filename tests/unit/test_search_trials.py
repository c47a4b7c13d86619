"""How the search controller follows a trial's metrics file as it grows (launch/trials.py):
whole lines only, from where it left off, and from the start again when a resumed attempt
rewrote the file (run/metrics.py: keep_until), without reporting a step twice."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.common.files import write_atomic
from orchestrator.launch.trials import Running, new_records, report


class Trial:
    """What the controller calls on an Optuna trial: report and should_prune (here: never)."""

    number = 0

    def __init__(self) -> None:
        self.reported: list[tuple[int, float]] = []

    def report(self, value: float, step: int) -> None:
        self.reported.append((step, value))

    def should_prune(self) -> bool:
        return False


class Alive:
    """A trial process still running (subprocess.Popen's poll)."""

    def poll(self) -> None:
        return None


def _line(step: int, loss: float) -> str:
    return json.dumps({"step": step, "loss": loss}) + "\n"


def test_the_metrics_file_is_followed_from_where_it_was_left(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    running = Running(Trial(), Alive(), tmp_path, path)  # type: ignore[arg-type]
    assert new_records(running) == []  # not written yet
    path.write_text(_line(1, 5.0) + json.dumps({"event": "start"}) + "\n" + '{"step": 2, "lo')
    assert [r.get("step") for r in new_records(running)] == [1, None]  # not the cut-off line
    with open(path, "a") as f:
        f.write('ss": 4.0}\n' + _line(3, 3.0))
    assert [r["step"] for r in new_records(running)] == [2, 3]
    assert new_records(running) == []
    write_atomic(path, _line(1, 5.0) + _line(2, 4.0))  # resumed from step 2: rewritten
    assert [r["step"] for r in new_records(running)] == [1, 2]


def test_a_step_is_reported_once_across_a_resume(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    trial = Trial()
    running = Running(trial, Alive(), tmp_path, path)  # type: ignore[arg-type]
    path.write_text(_line(1, 5.0) + _line(2, 4.0) + _line(3, 3.5))
    report(running, "loss")
    write_atomic(path, _line(1, 5.0) + _line(2, 4.0))  # the attempt resumed from step 2
    with open(path, "a") as f:
        f.write(_line(3, 3.4) + _line(4, 3.0))
    report(running, "loss")
    assert trial.reported == [(1, 5.0), (2, 4.0), (3, 3.5), (4, 3.0)]


def test_every_trial_logs_into_the_studys_wandb_group() -> None:
    """The overrides each trial gets (a trial is an ordinary run: W&B's group and run name
    reach its run files as for any run, tests/distributed/test_strategies.py); none when W&B is
    off or the command line names a group itself."""
    from orchestrator.launch.search import _wandb
    from tests.conftest import make_job

    def job(*overrides: str):  # noqa: ANN202
        return make_job(["action=search", "search=example", "eval.every_steps=5", *overrides],
                        run_dir="runs/lr")

    assert _wandb(job("logging.wandb.mode=offline"), 7) == [
        "logging.wandb.group=lr", "logging.wandb.name=lr-trial-0007"]
    assert _wandb(job("logging.wandb.mode=offline", "search.study=s1"), 0) == [
        "logging.wandb.group=s1", "logging.wandb.name=s1-trial-0000"]
    assert _wandb(job("logging.wandb.mode=disabled"), 7) == []
    assert _wandb(job("logging.wandb.mode=offline", "logging.wandb.group=mine"), 7) == []


def test_the_last_step_is_never_pruned(tmp_path: Path) -> None:
    """A trial that logged its last step has finished training: a pruner's verdict there would
    throw its final value away (the same record before the last step is pruned)."""
    from unittest import mock

    class Pruning(Trial):
        def should_prune(self) -> bool:
            return True

    path = tmp_path / "metrics.jsonl"
    path.write_text(_line(1, 5.0) + _line(2, 4.0))
    for final_step, pruned_at in ((2, None), (3, 1)):
        running = Running(Pruning(), Alive(), tmp_path, path,  # type: ignore[arg-type]
                          last_step=1 if final_step == 2 else -1, final_step=final_step)
        with mock.patch("orchestrator.launch.trials.stop") as stop:
            report(running, "loss")
        assert (stop.call_args.args[1] if stop.called else None) == pruned_at
