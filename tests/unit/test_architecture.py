"""The architecture's rules that `lint-imports` does not check (docs/architecture.md): the
package's top level is the layers, the registries name what exists, and package `__init__`
files only re-export."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util

from orchestrator.common.contract import RECIPES
from orchestrator.config.derived import TORCH_STRATEGIES, strategy_name
from orchestrator.config.schema import TrainConfig
from orchestrator.run.setup import STRATEGIES
from orchestrator.transforms.converters import CONVERTERS
from tests.conftest import REPO, make_job

LAYERS = {"common", "config", "data", "models", "quantization", "transforms", "planning",
          "launch", "run", "reports"}


def test_the_top_level_holds_only_the_entry_points_and_the_layers() -> None:
    top = {p.name for p in (REPO / "orchestrator").iterdir() if p.name != "__pycache__"}
    assert top == {"__init__.py", "__main__.py", "cli.py", *LAYERS}


def test_every_task_has_a_recipe_and_every_strategy_a_module() -> None:
    (task,) = [f for f in dataclasses.fields(TrainConfig) if f.name == "task"]
    assert set(RECIPES) == set(task.metadata["choices"])
    pipeline = strategy_name(make_job(["model=llama_tiny", "parallelism.pipeline_parallel=2"]))
    context = strategy_name(make_job(["model=llama_tiny", "parallelism.context_parallel=2"]))
    assert set(STRATEGIES) == {*TORCH_STRATEGIES.values(), "deepspeed", pipeline, context}
    for module in (*RECIPES.values(), *STRATEGIES.values()):
        assert importlib.util.find_spec(module) is not None, module
    assert [c.name for c in CONVERTERS] == ["lora", "dpo_reference", "qat", "float8",
                                            "activation_checkpointing", "compile"]


def test_package_inits_only_re_export() -> None:
    """No function or class is defined in a package `__init__` (data/ keeps its lazy
    `__getattr__`, which only re-exports the torch side on first use)."""
    for init in (REPO / "orchestrator").rglob("__init__.py"):
        tree = ast.parse(init.read_text())
        defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        allowed = ["__getattr__"] if init.parent.name == "data" else []
        if init.parent.name == "orchestrator":
            allowed = []
        assert defined == allowed, (init, defined)
