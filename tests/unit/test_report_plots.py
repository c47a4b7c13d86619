"""`action=report`: PNG charts and report.md of a run dir or a sweep dir, and the sweep
summary's loss curves (one plotting path: orchestrator/reports/charts.py)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from orchestrator.cli import execute
from orchestrator.reports import charts, report
from orchestrator.reports.sweep import PLOT, summarize
from tests.conftest import make_job, run_cli


def _write_metrics(run_dir: Path, losses: list[float], val_every: int = 0,
                   world_size: int = 2) -> None:
    """metrics.jsonl as MetricsLogger writes it: a "start" event, then one record per step."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = [{"event": "start", "world_size": world_size, "nodes": ["n0"] * 2,
                         "device": "cpu", "setup_peak_mem_bytes": [1, 1]}]
    for step, loss in enumerate(losses, 1):
        row = {"step": step, "loss": loss, "lr": 1e-3, "tokens_per_s": 1000.0 + 10 * step,
               "step_time_s": 0.1, "peak_mem_bytes": 1}
        if val_every and step % val_every == 0:
            row["val/loss"] = loss + 0.5 - 0.01 * step
        rows.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _check_png(path: Path) -> None:
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (charts.WIDTH, charts.HEIGHT)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 2, f"{path} is blank"


def test_run_report_writes_charts_and_summary(tmp_path) -> None:
    run_dir = tmp_path / "run"
    losses = [4.0, 3.5, 3.25, 3.1, 2.9876]
    _write_metrics(run_dir, losses, val_every=2)
    written = report.report(run_dir)
    out = run_dir / report.REPORT_DIR
    assert written == [out / report.LOSS_PNG, out / report.TOKENS_PNG, out / report.REPORT_MD]
    for png in written[:2]:
        _check_png(png)
    md = (out / report.REPORT_MD).read_text()
    assert "| final loss | 2.9876 |" in md
    assert "| world size | 2 |" in md
    assert "| steps | 5 (5 records) |" in md
    # val/loss on steps 2 and 4: 3.98, 3.56; the best is the later one, which is also the last
    assert "| best val/loss | 3.5600 (step 4) |" in md
    assert "| median tokens/s | 1,035 |" in md  # steps 2..5: 1020, 1030, 1040, 1050
    assert "![loss](loss.png)" in md and "![tokens_per_s](tokens_per_s.png)" in md


def test_run_report_without_val_loss_or_steps(tmp_path) -> None:
    """A run that died before its first step still gets charts (saying so) and a summary."""
    _write_metrics(tmp_path / "a", [3.0])
    md = (report.report(tmp_path / "a")[-1]).read_text()
    assert "val/loss" not in md and "| final loss | 3.0000 |" in md
    _write_metrics(tmp_path / "b", [])
    written = report.report(tmp_path / "b")
    _check_png(written[0])
    assert "| final loss | - |" in written[-1].read_text()


def test_sweep_summary_and_report(tmp_path) -> None:
    curves = {"0": [5.0, 4.0, 3.0], "1": [5.0, 4.5, 4.25], "2": None}
    for name, values in curves.items():
        point = tmp_path / name
        point.mkdir()
        (point / "plan.json").write_text("{}")
        (point / "overrides.txt").write_text(f"optim.lr={name}e-3\n")
        if values is not None:
            _write_metrics(point, values)
    summarize(tmp_path)
    assert PLOT == "loss_curves.png"
    _check_png(tmp_path / PLOT)
    assert not list(tmp_path.glob("*.svg"))
    summary = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert summary["points"][0]["steps"] == [1, 2, 3]

    written = report.report(tmp_path)
    out = tmp_path / report.REPORT_DIR
    assert written == [out / report.CURVES_PNG, out / report.TOKENS_PNG, out / report.REPORT_MD]
    for png in written[:2]:
        _check_png(png)
    md = written[-1].read_text()
    assert "| 0 | optim.lr=0e-3 | COMPLETED | 3.0000 | 1,025 |" in md
    assert "| 2 | optim.lr=2e-3 | NO METRICS | - | - |" in md
    assert "best: point 0 (optim.lr=0e-3), final loss 3.0000" in md


def test_cli_report_and_bad_run_dir(tmp_path) -> None:
    """One CLI process: the real entry point dispatches action=report; a directory that is
    neither a run nor a sweep is one error line, exit code 2, nothing written."""
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli(["action=report", f"run_dir={empty}"], tmp_path / "unused")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config key 'run_dir'"), proc.stderr
    assert "metrics.jsonl" in lines[0] and "sweep_summary.json" in lines[0]
    assert list(empty.iterdir()) == [] and not (tmp_path / "unused").exists()


def test_report_dispatch_in_process(tmp_path, capsys) -> None:
    """action=report takes the run_dir given (not Hydra's output dir) and prints each path."""
    run_dir = tmp_path / "run"
    _write_metrics(run_dir, [3.0, 2.5])
    job = make_job(["action=report", f"run_dir={run_dir}"])
    assert job.run_dir == str(run_dir)
    assert execute(job) == 0
    out = run_dir / report.REPORT_DIR
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {out / name}" for name in (report.LOSS_PNG, report.TOKENS_PNG, report.REPORT_MD)]
