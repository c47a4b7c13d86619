"""A sweep runs every point whatever one of them does: a failed point is a row of the summary
(state FAILED and its error line) and the sweep's exit code says a point failed; a sweep
directory that holds an earlier sweep is refused before Hydra writes into it (issue 24)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

PLAN = ["model=gpt2_tiny", "action=plan", "logging.progress=false"]


def sweep(sweep_dir, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", "-m", *PLAN, *extra,
                           f"hydra.sweep.dir={sweep_dir}"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_a_failed_point_is_a_row_and_the_sweep_goes_on(tmp_path) -> None:
    proc = sweep(tmp_path / "s", "optim.lr=-1,1e-3")
    assert proc.returncode == 2, proc.stderr[-2000:]  # the first failed point's exit code
    summary = json.loads((tmp_path / "s" / "sweep_summary.json").read_text())
    states = {p["point"]: (p["state"], p["error"]) for p in summary["points"]}
    assert states["0"] == ("FAILED", "config key 'optim.lr' has value -1.0; allowed: a number "
                                     "> 0")
    assert states["1"][0] != "FAILED"  # planned after the failure: the sweep went on
    assert (tmp_path / "s" / "1" / "plan.json").is_file()
    md = (tmp_path / "s" / "sweep_summary.md").read_text()
    (row,) = [line for line in md.splitlines() if line.startswith("| 0 |")]
    assert row.endswith("optim.lr=-1 | FAILED | - | - |"), row
    assert "point 0 failed: config key 'optim.lr' has value -1.0" in md


def test_a_sweep_dir_in_use_is_refused_before_anything_is_written(tmp_path) -> None:
    first = sweep(tmp_path / "s", "optim.lr=1e-3")
    assert first.returncode == 0, first.stderr[-2000:]
    kept = (tmp_path / "s" / "multirun.yaml").read_text()
    again = sweep(tmp_path / "s", "optim.lr=2e-3,3e-3")
    assert again.returncode == 2
    assert again.stderr == (f"error: config key 'hydra.sweep.dir' has value '{tmp_path / 's'}'; "
                            "allowed: a new or empty directory, or run.overwrite=true to "
                            "replace the earlier sweep in it; nothing was written\n")
    assert (tmp_path / "s" / "multirun.yaml").read_text() == kept
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir()) == ["0"]
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = sweep(foreign, "optim.lr=1e-3")
    assert refused.returncode == 2 and "holds files that are not a sweep of ours" in refused.stderr
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
