"""A study's summary, written after every finished trial: `search_summary.json` and `.md` (the
trials best first: state, value, parameters, steps run, run dir) and `best.yaml`, the best
trial's parameters with the command that reruns it. Read from Optuna's storage and the
trials' own metrics files.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from orchestrator.common.files import write_atomic
from orchestrator.common.records import read_metrics
from orchestrator.launch.search import LAYOUT
from orchestrator.planning.layouts import override

SUMMARY_JSON, SUMMARY_MD, BEST_YAML = "search_summary.json", "search_summary.md", "best.yaml"
REPORT_DIR, REPORT_MD = "report", "report.md"


def _steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    steps = [r["step"] for r in read_metrics(path) if "step" in r] if path.is_file() else []
    return max(steps, default=0)


def rows(study: Any, study_dir: Path, trial_dir: str) -> list[dict[str, Any]]:
    """One row per trial: completed ones by value (best first), then the others (pruned ones
    by the last value they reported)."""
    out = []
    for t in study.get_trials(deepcopy=False):
        run_dir = study_dir / trial_dir.format(t.number)
        out.append({"number": t.number, "state": t.state.name, "value": t.value,
                    "params": t.params, "layout": t.user_attrs.get(LAYOUT),
                    "steps": _steps(run_dir), "run_dir": str(run_dir)})
    sign = -1 if study.direction.name == "MAXIMIZE" else 1
    return sorted(out, key=lambda r: (r["state"] != "COMPLETE", r["value"] is None,
                                      sign * r["value"] if r["value"] is not None else 0,
                                      r["number"]))


def write_summary(study: Any, study_dir: Path, trial_dir: str, metric: str,
                  shared: list[str], storage: str | None = None) -> list[Path]:
    """The summary files and, once a trial has completed, best.yaml. `storage`: the study's
    database URL (None: the journal file in the study dir), for `action=report` to find it."""
    table = rows(study, study_dir, trial_dir)
    summary = {"study": study.study_name, "storage": storage,
               "direction": study.direction.name.lower(), "metric": metric, "trials": table}
    write_atomic(study_dir / SUMMARY_JSON, json.dumps(summary, indent=2) + "\n")
    paths = [study_dir / SUMMARY_JSON]
    lines = [f"# Study {study.study_name}: {metric}, {summary['direction']}", "",
             "| trial | state | value | parameters | steps | run dir |",
             "|---|---|---|---|---|---|"]
    for r in table:
        value = "" if r["value"] is None else f"{r['value']:.6g}"
        params = r["layout"] or ", ".join(f"{k}={v}" for k, v in r["params"].items())
        lines.append(f"| {r['number']} | {r['state']} | {value} | {params} | {r['steps']} | "
                     f"{r['run_dir']} |")
    write_atomic(study_dir / SUMMARY_MD, "\n".join(lines) + "\n")
    paths.append(study_dir / SUMMARY_MD)
    best = next((r for r in table if r["state"] == "COMPLETE"), None)
    if best is not None:
        params = [override(k, v) for k, v in best["params"].items()]
        command = shlex.join([Path(sys.executable).name, "-m", "orchestrator", *shared, *params])
        text = (f"# trial {best['number']}: {metric} = {best['value']:.6g}\n# rerun: {command}\n"
                + yaml.safe_dump({"trial": best["number"], "value": best["value"],
                                  "overrides": [*shared, *params]}, sort_keys=False))
        write_atomic(study_dir / BEST_YAML, text)
        paths.append(study_dir / BEST_YAML)
    return paths


def draw_study(study: Any, study_dir: Path) -> list[Path]:
    """Optuna's plots of the study and `report/report.md` showing them with the summary."""
    from orchestrator.reports.search_plots import draw

    out = study_dir / REPORT_DIR
    pngs, skipped = draw(study, out)
    table = (study_dir / SUMMARY_MD).read_text() if (study_dir / SUMMARY_MD).is_file() else ""
    lines = [table, *(f"![{p.stem}]({p.name})" for p in pngs),
             *(f"- {name}: not drawn ({why})" for name, why in skipped.items())]
    write_atomic(out / REPORT_MD, "\n".join(lines) + "\n")
    return [*pngs, out / REPORT_MD]


def study_report(study_dir: Path) -> list[Path]:
    """`action=report run_dir=<study dir>`: the plots drawn again from the study's storage."""
    import optuna

    from orchestrator.launch.search import study_storage

    summary = json.loads((study_dir / SUMMARY_JSON).read_text())
    study = optuna.load_study(study_name=summary["study"],
                              storage=study_storage(study_dir, summary.get("storage")))
    return draw_study(study, study_dir)
