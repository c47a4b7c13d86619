"""LoRA fine-tuning (peft): only the adapters train under every strategy, memory follows the
plan's trainable/frozen split, and the saved model has the adapters merged in."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator.models.build import build_model
from tests.conftest import make_job
from tests.distributed.checks import assert_memory_matches_plan, losses

RECIPE = "finetune_lora"
STRATEGIES = {
    "ddp": ["parallelism=ddp"],
    "zero1": ["parallelism=zero1"],
    "fsdp_zero3": ["parallelism=zero3"],
    "deepspeed_zero2": ["parallelism=zero2", "parallelism.backend=deepspeed"],
    "deepspeed_zero3": ["parallelism=zero3", "parallelism.backend=deepspeed"],
}


@pytest.mark.parametrize("name", STRATEGIES)
def test_lora_trains_the_same_under_every_strategy(recipe_runs, name: str) -> None:
    got = losses(recipe_runs[name])
    assert sum(got[-5:]) / 5 < sum(got[:5]) / 5 - 0.1
    assert got == pytest.approx(losses(recipe_runs["ddp"]), abs=1e-4)
    plan = json.loads((recipe_runs[name] / "plan.json").read_text())["compute"]
    assert 0 < plan["trainable_params"] < plan["params"] / 10


@pytest.mark.parametrize("name", STRATEGIES)
def test_frozen_weights_take_no_gradient_or_optimizer_memory(recipe_runs, name: str) -> None:
    assert_memory_matches_plan(recipe_runs[name], tol=0.02)
    mem = json.loads((recipe_runs[name] / "plan.json").read_text())["memory"]["moments"]
    # Adam state for the adapters only: far below the 8 bytes per parameter of full training.
    psi = json.loads((recipe_runs[name] / "plan.json").read_text())["compute"]["params"]
    assert mem["after_backward"]["optimizer_bytes"] < psi


@pytest.mark.parametrize("name", ["ddp", "fsdp_zero3", "deepspeed_zero3"])
def test_saved_model_is_the_adapted_model_merged(recipe_runs, base, name: str) -> None:
    import peft

    saved = recipe_runs[name] / "model"
    job = make_job(["model=gpt2_tiny", f"model.pretrained_path={saved}"])
    merged = build_model(job.model, seed=0).eval()
    base_model = build_model(make_job([f"model.pretrained_path={base}"]).model, seed=0)
    adapted = peft.PeftModel.from_pretrained(base_model, saved / "adapter").eval()
    ids = torch.randint(0, 258, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    before = build_model(make_job([f"model.pretrained_path={base}"]).model, seed=0).state_dict()
    after = merged.state_dict()
    # Only the adapted projections changed; everything else is the base model bit for bit.
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)}
