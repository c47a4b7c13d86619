"""Fixtures for modules that run one recipe from a saved model under several strategies: such a
module sets RECIPE, STRATEGIES (name -> overrides) and optionally OVERRIDES (for every run), and
asks for `base` / `recipe_runs`."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.models.build import build_model
from tests.conftest import make_job
from tests.distributed.checks import run_all


@pytest.fixture(scope="module")
def base(tmp_path_factory, request) -> Path:
    """A randomly initialised gpt2_tiny saved with transformers' own `save_pretrained`."""
    path = tmp_path_factory.mktemp(request.module.RECIPE) / "base"
    build_model(make_job(["model=gpt2_tiny"]).model, seed=5).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def recipe_runs(base, request) -> dict[str, Path]:
    """`+recipe=RECIPE` from `base`, once per strategy, into directories beside it."""
    return run_all(base.parent, {
        name: [f"+recipe={request.module.RECIPE}", f"model.pretrained_path={base}",
               "logging=none", *getattr(request.module, "OVERRIDES", []), *overrides]
        for name, overrides in request.module.STRATEGIES.items()})
