"""`action=search` on the local launcher with real processes: an Optuna study of 8 trials, 2 in
flight, over a learning rate range that holds clearly bad values (up to 10) and a micro batch,
for gpt2_tiny (each trial a 1-rank run), judged by the held-out loss at evaluations every 3 of
12 steps, with the median pruner; its controller is SIGKILLed mid-study and the same command
finishes it. Read back independently: some trial is pruned before its last step (its own
metrics stop early, its run dir says PRUNED); each completed trial's value is the last
`val/loss` of its own metrics file, the best trial is the best of those, and Optuna's own
`load_study` on the journal agrees; two trials ran at the same time; the killed trials ran
again, no trial number twice, no process left; the same command again runs nothing more."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.common.records import read_metrics
from tests.conftest import REPO, cli_command, run_ok

SEARCH = ["action=search", "search=example", "search.trials=8", "search.parallel=2",
          "+search.params.optim.lr='tag(log, interval(1e-3, 10.0))'", "model=gpt2_tiny",
          "train.steps=12", "eval.every_steps=3", "eval.holdout=0.1", "logging=none",
          "train.save_model=false", "train.stop_on_nonfinite=false",
          "cluster.gpus_per_node=1"]  # one rank a trial: the search, not the run, is tested


def last_val_loss(run_dir: Path) -> float:
    return [r["val/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in r][-1]


def _ours(study: Path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], text=True, capture_output=True).stdout
    return [line for line in out.splitlines() if str(study) in line and "ps -eo" not in line]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """The study, its controller SIGKILLed once the first trial has logged (its 2 trials in
    flight die with it), then finished by the same command."""
    out = tmp_path_factory.mktemp("search") / "study"
    proc = subprocess.Popen(cli_command(SEARCH, out), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("trial-*/metrics.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)  # the controller only: its trials die with it (lifeline)
    proc.wait()
    time.sleep(1)
    assert not _ours(out), _ours(out)
    run_ok(SEARCH, out)
    return out


def test_the_best_trial_is_the_best_of_the_trials_own_metrics(study: Path) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    summary = json.loads((study / "search_summary.json").read_text())
    trials = summary["trials"]
    assert len(trials) == 10  # 8 counted, and the 2 the killed controller left
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    for t in complete:
        assert t["value"] == pytest.approx(last_val_loss(Path(t["run_dir"])), abs=0)
        assert t["steps"] == 12
    best = min(complete, key=lambda t: last_val_loss(Path(t["run_dir"])))
    assert trials[0]["number"] == best["number"]
    storage = JournalStorage(JournalFileBackend(str(study / "study.journal")))
    loaded = optuna.load_study(study_name="study", storage=storage)
    assert loaded.best_trial.number == best["number"]
    assert len(loaded.trials) == 10
    assert f"train.micro_batch_size={best['params']['train.micro_batch_size']}" in \
        (study / "best.yaml").read_text()


def test_a_bad_trial_is_pruned_before_its_last_step(study: Path) -> None:
    """Its metrics stop early (the stop vote: every rank after the same step), its run dir
    says PRUNED, and Optuna's storage has it PRUNED with the values it reported."""
    trials = json.loads((study / "search_summary.json").read_text())["trials"]
    pruned = [t for t in trials if t["state"] == "PRUNED"]
    assert pruned, [(t["number"], t["state"], t["params"]) for t in trials]
    for t in pruned:
        run_dir = Path(t["run_dir"])
        assert 3 <= t["steps"] < 12
        assert json.loads((run_dir / "search_trial.json").read_text())["state"] == "PRUNED"
        steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
        assert max(steps) == t["steps"]


def test_two_trials_ran_at_the_same_time(study: Path) -> None:
    """search.parallel=2: some two trials' runs overlap in time (each from its config.yaml,
    written at launch, to its metrics file's last write)."""
    spans = sorted(((d / "config.yaml").stat().st_mtime, (d / "metrics.jsonl").stat().st_mtime)
                   for d in study.glob("trial-*") if (d / "metrics.jsonl").is_file())
    assert len(spans) >= 8
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))


def test_trials_in_flight_share_the_cpus(study: Path) -> None:
    """Each of the 2 trials in flight runs on half of this machine's CPUs, and its one rank
    plans its threads for that half (not all of them: two trials would oversubscribe every
    core)."""
    half = len(os.sched_getaffinity(0)) // 2
    for plan in study.glob("trial-*/plan.json"):
        assert json.loads(plan.read_text())["env"]["OMP_NUM_THREADS"] == str(half)


def test_the_plots_are_drawn_and_report_draws_them_again(study: Path) -> None:
    """Optuna's four plots as PNGs in report/ after the study; `action=report` on the study
    dir draws them again from its storage."""
    import matplotlib.image

    names = ["optimization_history", "intermediate_values", "param_importances",
             "parallel_coordinate"]
    for name in names:
        height, width, _ = matplotlib.image.imread(study / "report" / f"{name}.png").shape
        assert height > 100 and width > 100
        (study / "report" / f"{name}.png").unlink()
    proc = run_ok(["action=report", f"run_dir={study}"], study.parent / "report-cli")
    for name in names:
        assert f"wrote {study / 'report' / name}.png" in proc.stdout
        assert f"![{name}]({name}.png)" in (study / "report" / "report.md").read_text()


def test_the_study_plan_was_written_before_the_trials(study: Path) -> None:
    """search_plan.json: the corners of the space planned (lr's two ends x 2 micro batches);
    the larger micro batch is the costlier trial (its activations; the plan's figures
    themselves are tested in tests/unit/test_search_space.py)."""
    plan = json.loads((study / "search_plan.json").read_text())
    assert plan["trials"] == 8 and plan["corners_planned"] == 4 and not plan["refused"]
    assert plan["trial_max"]["params"]["train.micro_batch_size"] == 4
    assert plan["trial_min"]["params"]["train.micro_batch_size"] == 2


def test_the_same_command_again_runs_no_more_trials(study: Path) -> None:
    proc = run_ok(SEARCH, study)
    assert "started" not in proc.stdout
    assert len([d for d in study.glob("trial-*") if d.is_dir()]) == 10
    assert proc.stdout.splitlines()[-1].startswith("best: trial ")



def test_a_killed_controller_was_finished_by_the_same_command(study: Path) -> None:
    """The 2 trials in flight when it was killed are FAIL and ran again once (queued with
    their parameters); with them the study counts exactly 8 trials, no number twice, and no
    process is left."""
    trials = json.loads((study / "search_summary.json").read_text())["trials"]
    numbers = [t["number"] for t in trials]
    assert len(numbers) == len(set(numbers)) == 10
    assert sum(1 for t in trials if t["state"] == "FAIL") >= 2
    assert not _ours(study)


def test_trials_compose_with_the_users_config_dir(tmp_path: Path) -> None:
    """A model defined only in the user's own `--config-dir` reaches every trial (each trial's
    CLI composes its config again) and best.yaml's rerun command."""
    (tmp_path / "conf" / "model").mkdir(parents=True)
    mine = (REPO / "configs" / "model" / "gpt2_tiny.yaml").read_text()
    (tmp_path / "conf" / "model" / "mine.yaml").write_text(mine.replace("gpt2_tiny", "mine"))
    out = tmp_path / "study"
    run_ok(["--config-dir", str(tmp_path / "conf"), "action=search", "model=mine",
            "+search.params.optim.lr='choice(1e-3)'", "search.trials=1", "search.pruner=none",
            "search.metric=loss", "train.steps=3", "logging=none", "train.save_model=false",
            "cluster.gpus_per_node=1"], out)
    import yaml

    assert yaml.safe_load((out / "trial-0000" / "config.yaml").read_text())["model"]["name"] \
        == "mine"
    assert f"--config-dir {tmp_path / 'conf'}" in (out / "best.yaml").read_text()
