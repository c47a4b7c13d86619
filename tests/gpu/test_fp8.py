"""precision=fp8 on a GPU with float8 tensor cores (compute capability >= 8.9): torchao's float8
linears train under FSDP2 and DDP, close to bf16 but not identical to it (run where such a GPU
is lent; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from orchestrator.common.records import read_metrics
from tests.conftest import run_ok

FP8_READY = torch.cuda.is_available() and torch.cuda.get_device_capability(0) >= (8, 9)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not FP8_READY, reason="needs a GPU of compute capability >= 8.9")]
# every linear's dimensions are multiples of 16, so with fp8_filter=all every one but the head
# becomes float8 (torchao's size filter would keep these small ones bf16: this is about the
# math; gpu_check.sh's compiled Llama rows are about the speed)
LLAMA = ["model=llama_tiny", "model.d_model=256", "model.d_ff=512", "cluster.device=cuda",
         "cluster.gpus_per_node=1", "logging=none", "train.steps=30"]


@pytest.mark.parametrize("recipe", ["fsdp_zero3", "fsdp_zero3-all_gather", "ddp"])
def test_fp8_trains_close_to_bf16(tmp_path, recipe: str) -> None:
    out = {}
    name, _, gather = recipe.partition("-")
    for precision in ("bf16", "fp8"):
        extra = ["precision.fp8_filter=all"] if precision == "fp8" else []
        extra += ["precision.fp8_all_gather=true"] if gather and precision == "fp8" else []
        run_ok([f"+recipe={name}", *LLAMA, f"precision={precision}", *extra],
               tmp_path / precision)
        out[precision] = [m["loss"] for m in read_metrics(tmp_path / precision / "metrics.jsonl")]
    assert out["fp8"][-1] < out["fp8"][0] - 0.1
    diff = max(abs(a - b) for a, b in zip(out["fp8"], out["bf16"], strict=True))
    assert 1e-6 < diff < 0.05 * out["bf16"][0]  # float8 rounding shows, but stays small
