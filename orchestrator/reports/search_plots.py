"""A study's plots, drawn by Optuna's own matplotlib functions from its storage, as PNGs in
`<study>/report/`: the optimisation history, the intermediate values (pruned trials' curves
end where they were stopped), the parameter importances and the parallel coordinates.

Importances use Optuna's PED-ANOVA evaluator: its default (fANOVA) needs scikit-learn, which
nothing else here does. A plot Optuna cannot draw yet (e.g. importances before two trials have
completed) is listed with Optuna's reason instead of failing the report.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

PLOTS = ("optimization_history", "intermediate_values", "param_importances",
         "parallel_coordinate")


def _plotters() -> dict[str, Callable[[Any], Any]]:
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization import matplotlib as vis

    return {
        "optimization_history": vis.plot_optimization_history,
        "intermediate_values": vis.plot_intermediate_values,
        "param_importances": lambda study: vis.plot_param_importances(
            study, evaluator=PedAnovaImportanceEvaluator()),
        "parallel_coordinate": vis.plot_parallel_coordinate,
    }


def draw(study: Any, out_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """The PNGs written, and the plots not drawn with why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = [], {}
    for name, plot in _plotters().items():
        path = out_dir / f"{name}.png"
        try:
            with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
                warnings.simplefilter("ignore")
                ax = plot(study)
        except (ValueError, RuntimeError) as e:
            skipped[name] = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            path.unlink(missing_ok=True)  # an earlier drawing is no longer this study's
            continue
        figure = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written, skipped
