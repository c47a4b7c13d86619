"""Every shipped config file composes, validates and plans (parametrised over the files on disk)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config.derived import Hardware
from orchestrator.models.build import build_model
from orchestrator.planning.plan import make_plan
from orchestrator.planning.preflight import validate
from tests.conftest import REPO, make_job

CONFIGS = REPO / "configs"
OPTIONS = sorted(
    (p.parent.name, p.stem) for p in CONFIGS.glob("*/*.yaml")
)


def _overrides(group: str, option: str, tmp_path: Path) -> list[str]:
    if (group, option) == ("recipe", "quantize"):  # PTQ needs a model to quantize
        build_model(make_job([]).model, seed=0).save_pretrained(tmp_path / "model")
        return ["+recipe=quantize", f"model.pretrained_path={tmp_path / 'model'}"]
    if (group, option) == ("precision", "fp8"):  # float8 tensor cores and nn.Linear layers
        return ["precision=fp8", "model=llama_tiny", "cluster.device=cuda", "cluster.gpu=h100"]
    return [f"+recipe={option}"] if group == "recipe" else [f"{group}={option}"]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}/{o}" for g, o in OPTIONS])
def test_config_composes_validates_and_plans(group: str, option: str, tmp_path: Path) -> None:
    action = "search" if group == "search" else "plan"  # search keys are read by a search
    job = make_job([*_overrides(group, option, tmp_path), f"action={action}"],
                   run_dir="/tmp/unused")
    validate(job, Hardware())
    plan = make_plan(job, device=job.cluster.device.replace("auto", "cpu"), cpu_count=2)
    assert plan.world_size == job.cluster.nodes * job.cluster.gpus_per_node
    assert plan.compute.params > 0 and plan.memory.peak_bytes > 0
    if group != "recipe":
        assert getattr(job, group).name == option  # the file really was selected


def test_every_group_option_is_covered() -> None:
    groups = {g for g, _ in OPTIONS}
    assert {"model", "precision", "parallelism", "data", "launcher", "logging", "recipe"} <= groups


@pytest.mark.parametrize("recipe", ["ddp", "zero1", "fsdp_zero2", "fsdp_zero3"])
def test_recipe_opens_with_its_command(recipe: str) -> None:
    lines = (CONFIGS / "recipe" / f"{recipe}.yaml").read_text().splitlines()
    # Hydra only reads the `@package` header before any other line, so the command comes next.
    assert lines[0] == "# @package _global_"
    assert lines[1] == f"# python -m orchestrator +recipe={recipe}"


@pytest.mark.parametrize(("recipe", "stage"),
                         [("ddp", 0), ("zero1", 1), ("fsdp_zero2", 2), ("fsdp_zero3", 3)])
def test_recipe_selects_its_zero_stage_and_scales_by_override(recipe: str, stage: int) -> None:
    job = make_job([f"+recipe={recipe}", "model=gpt2", "cluster.gpus_per_node=8",
                    "cluster.device=cuda", "action=plan"])
    assert job.parallelism.zero_stage == stage
    plan = make_plan(job, device="cuda", cpu_count=2)
    assert plan.world_size == 8 and plan.backend == "nccl"
    # GPT-2 small as Hugging Face counts it (tied embeddings once): 124,439,808 parameters.
    assert plan.compute.params == 124_439_808
