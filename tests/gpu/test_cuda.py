"""The same recipes on one CUDA device with bf16 (run where a GPU is lent; skipped elsewhere)."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator.common.records import read_metrics
from tests.conftest import run_ok

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("recipe", ["ddp", "zero1", "fsdp_zero2", "fsdp_zero3",
                                    "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3"])
def test_recipe_trains_on_one_gpu_in_bf16(tmp_path, recipe: str) -> None:
    run_ok([f"+recipe={recipe}", "cluster.device=cuda", "cluster.gpus_per_node=1",
                    "precision=bf16", "logging=none"], tmp_path)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["backend"] == "nccl" and plan["device"] == "cuda"
    losses = [m["loss"] for m in read_metrics(tmp_path / "metrics.jsonl")]
    assert losses[-1] < losses[0] - 0.1
    measured = json.loads((tmp_path / "memory" / "rank0.json").read_text())["moments"]
    for moment, planned in plan["memory"]["moments"].items():
        assert measured[moment]["total_bytes"] == pytest.approx(planned["total_bytes"], rel=0.02)


def test_peak_memory_of_gpt2_is_within_10_percent_of_the_plan(tmp_path) -> None:
    from orchestrator.config.gpus import match

    props = torch.cuda.get_device_properties(0)
    gpu = match(props.name, props.total_memory)
    if gpu is None:
        pytest.skip(f"{props.name} is not in orchestrator/config/gpus.py")
    run_ok(["+recipe=fsdp_zero3", "model=gpt2", "cluster.device=cuda",
                    "cluster.gpus_per_node=1", f"cluster.gpu={gpu}", "precision=bf16",
                    "data.seq_len=1024", "train.micro_batch_size=8", "train.steps=5",
                    "logging=none"], tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    plan = json.loads((tmp_path / "plan.json").read_text())["memory"]
    # the plan's peak without its fragmentation allowance, against the largest per-interval
    # max_memory_allocated (the loop resets the peak after set-up and every logged interval)
    planned = plan["peak_total_bytes"] - plan["overhead_bytes"]
    assert all(r["peak_mem_planned_bytes"] == planned for r in rows)
    measured = max(r["peak_mem_bytes"] for r in rows)
    assert abs(measured / planned - 1) <= 0.10, (measured, planned)
    # the step clock stops after a device sync, so utilisation can never exceed the peak
    assert all(0 < r["mfu"] <= 1 for r in rows), [r["mfu"] for r in rows]


@pytest.mark.parametrize("model", ["bert_tiny", "t5_tiny"])
def test_every_tensor_of_a_cuda_batch_is_pinned(monkeypatch, model: str) -> None:
    """The objective's labels and masks are made after the loader pinned the ids: they are
    pinned too, so every copy to the GPU is asynchronous."""
    from orchestrator.common.contract import DEVICE_ENV
    from orchestrator.data import batches, train_and_held_out
    from tests.conftest import make_job

    monkeypatch.setenv(DEVICE_ENV, "cuda")
    job = make_job([f"model={model}"])
    dataset, _ = train_and_held_out(job)
    batch = next(batches(dataset, job, 0, 1))
    assert len(batch) > 1 and all(t.is_pinned() for t in batch.values()), \
        {k: t.is_pinned() for k, t in batch.items()}
