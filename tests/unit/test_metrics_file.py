"""`logging.metrics_file` is a setting, and every reader finds the file the run wrote: the sweep
summary, `action=report` (both hard-coded `metrics.jsonl` once) and a resumed run, which cuts
the records after its checkpoint's step from that file, not from another."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.common.records import read_metrics
from orchestrator.config.load import config_text
from orchestrator.reports import report
from orchestrator.reports.sweep import summarize
from orchestrator.run.metrics import MetricsLogger
from tests.conftest import make_job

OTHER = ["logging=none", "logging.progress=false", "logging.metrics_file=other.jsonl"]


def logged_run(run_dir: Path, losses: list[float]) -> None:
    """A run dir as a launch leaves it: config.yaml, plan.json, and its metrics written by the
    real rank-0 logger to `logging.metrics_file`."""
    job = make_job(OTHER, run_dir=str(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_text(job))
    (run_dir / "plan.json").write_text("{}")
    logger = MetricsLogger(job)
    for step, loss in enumerate(losses, 1):
        logger.log(step, {"loss": loss, "tokens_per_s": 100.0 * step})
    logger.close()
    assert (run_dir / "other.jsonl").is_file() and not (run_dir / "metrics.jsonl").exists()


def test_the_sweep_summary_and_report_read_the_configured_metrics_file(tmp_path) -> None:
    logged_run(tmp_path / "0", [5.0, 4.0, 3.0])
    logged_run(tmp_path / "1", [5.0, 4.5, 4.25])
    points = summarize(tmp_path)
    assert [(p["state"], p["final_loss"]) for p in points] == [("COMPLETED", 3.0),
                                                               ("COMPLETED", 4.25)]
    md = report.report(tmp_path)[-1].read_text()
    assert "NO METRICS" not in md and "| 0 |" in md
    run_md = report.report(tmp_path / "0")[-1].read_text()
    assert "| final loss | 3.0000 |" in run_md and "| steps | 3 (3 records) |" in run_md


def test_a_resume_cuts_the_configured_file_and_leaves_others_alone(tmp_path) -> None:
    logged_run(tmp_path, [5.0, 4.0, 3.0, 2.0])
    decoy = tmp_path / "metrics.jsonl"
    decoy.write_text(json.dumps({"step": 9, "loss": 1.0}) + "\n")
    job = make_job(OTHER, run_dir=str(tmp_path))
    MetricsLogger(job, resume_step=2).close()  # resumed from step 2's checkpoint
    assert [r["step"] for r in read_metrics(tmp_path / "other.jsonl")] == [1, 2]
    assert decoy.read_text() == json.dumps({"step": 9, "loss": 1.0}) + "\n"
