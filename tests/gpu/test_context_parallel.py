"""Context parallelism's ring attention on 2 CUDA devices (run by scripts/gpu_check.sh where 2
GPUs are lent; skipped elsewhere): 2 ranks splitting each sequence train like FSDP2 on 2
data-parallel ranks with the same samples per step, and hold their planned model state."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator.common.records import read_metrics
from tests.conftest import run_ok

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]

COMMON = ["model=llama_tiny", "data.seq_len=256", "model.max_seq_len=256", "+recipe=fsdp_zero3",
          "cluster.device=cuda", "cluster.gpus_per_node=2", "precision=fp32", "logging=none",
          "train.save_model=false"]


def test_ring_attention_trains_like_fsdp_on_the_same_samples(tmp_path) -> None:
    """fp32 (memory-efficient attention on both sides), 20 steps: within 1e-4 per step; the loss
    must move. Without the ring (each rank attending only to its own chunks) the losses part
    at the first step."""
    run_ok([*COMMON, "train.micro_batch_size=2"], tmp_path / "fsdp")  # 2 ranks x 2 samples
    run_ok([*COMMON, "train.micro_batch_size=4", "parallelism.context_parallel=2"],
           tmp_path / "cp")
    ref, got = ([m["loss"] for m in read_metrics(tmp_path / name / "metrics.jsonl")]
                for name in ("fsdp", "cp"))
    assert len(got) == len(ref) and ref[-1] < ref[0] - 0.1
    assert max(abs(a - b) for a, b in zip(got, ref, strict=True)) <= 1e-4
    plan = json.loads((tmp_path / "cp" / "plan.json").read_text())
    for rank in (0, 1):
        measured = json.loads((tmp_path / "cp" / "memory" / f"rank{rank}.json").read_text())
        for moment, planned in plan["memory"]["moments"].items():
            assert measured["moments"][moment]["total_bytes"] <= planned["total_bytes"] * 1.02
