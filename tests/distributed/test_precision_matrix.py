"""Every precision under every strategy (issue 15): each pair either trains on 2 real gloo ranks
with a falling loss, really computing in its format, or is refused at validation with its
reason. fp16's loss scaler skips a step whose gradients are not finite, leaves the weights
alone, halves the scale and counts the step in metrics.jsonl, under every strategy that runs
fp16 on this CPU (DeepSpeed needs oneDNN fp16 kernels). One torchrun start runs the whole
matrix (tests/distributed/precision_matrix.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.slow

STRATEGIES = {
    "ddp": ["+recipe=ddp"],
    "zero1": ["+recipe=zero1"],
    "fsdp_zero2": ["+recipe=fsdp_zero2"],
    "fsdp_zero3": ["+recipe=fsdp_zero3"],
    "deepspeed_zero0": ["+recipe=ddp", "parallelism.backend=deepspeed"],
    "deepspeed_zero1": ["+recipe=deepspeed_zero1"],
    "deepspeed_zero2": ["+recipe=deepspeed_zero2"],
    "deepspeed_zero3": ["+recipe=deepspeed_zero3"],
}
PRECISIONS = ["fp32", "fp16", "bf16", "bf16_pure", "fp8"]
LOW = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "bf16_pure": "bfloat16"}
INF_STEP = 3
# Largest per-step loss difference from the same strategy's fp32 run over 6 steps, measured on
# this machine kind (2026-11-30): 1.2e-4 to 5.0e-4 for every accepted pair. DeepSpeed stage 0
# (refused now) differed by 3.0e-2 in fp16 and 9.5e-3 in bf16: its updates were wrong, which
# this bound catches. Below 1e-6 nothing would have changed.
LOWER, UPPER = 1e-6, 5e-3
# The refused pairs and the reason each names (docs/precision.md lists the same).
REFUSED = {
    **{f"{s}/fp8": "fp8 needs a CUDA GPU of compute capability >= 8.9" for s in STRATEGIES
       if not s.startswith("deepspeed")},
    **{f"{s}/fp8": "with DeepSpeed (torchao's float8 training runs under DDP, ZeRO-1 and FSDP2)"
       for s in STRATEGIES if s.startswith("deepspeed")},
    **{f"{s}/bf16_pure": "with DeepSpeed (it always keeps an fp32 master copy)"
       for s in STRATEGIES if s.startswith("deepspeed")},
    **{f"deepspeed_zero0/{p}": "DeepSpeed's stage-0 fp16/bf16 optimizer wrapper mis-scales"
       for p in ("fp16", "bf16", "fp16+inf")},
    "ddp/bf16+param_dtype": "'auto' unless FSDP2",
    "fsdp_zero3/bf16+param_fp16": "unless precision=fp16 (fp16 gradients need its loss scaler)",
}
# DeepSpeed's CPU accelerator runs fp16 only on a CPU with oneDNN's fp16 kernels (the check it
# makes in deepspeed.initialize); CPUs of this machine kind differ.
DS_CPU_FP16 = torch.ops.mkldnn._is_mkldnn_fp16_supported()
if not DS_CPU_FP16:
    REFUSED.update({f"{s}/{p}": "with DeepSpeed on this CPU (DeepSpeed's CPU accelerator runs "
                    "fp16 only with oneDNN's fp16 kernels" for s in STRATEGIES
                    if s.startswith("deepspeed_zero") and s != "deepspeed_zero0"
                    for p in ("fp16", "fp16+inf")})
FP16_RUNS = [s for s in STRATEGIES if f"{s}/fp16" not in REFUSED]


def pairs() -> dict[str, list[str]]:
    out = {f"{s}/{p}": [*o, f"precision={p}"] for s, o in STRATEGIES.items() for p in PRECISIONS}
    out.update({f"{s}/fp16+inf": [*o, "precision=fp16", f"debug.inf_grad_at_step={INF_STEP}"]
                for s, o in STRATEGIES.items()})
    out["fsdp_zero3/bf16+reduce_bf16"] = ["+recipe=fsdp_zero3", "precision=bf16",
                                          "precision.reduce_dtype=bf16"]
    out["fsdp_zero2/fp32+param_bf16"] = ["+recipe=fsdp_zero2", "precision=fp32",
                                         "precision.param_dtype=bf16"]
    out["ddp/bf16+param_dtype"] = ["+recipe=ddp", "precision=bf16", "precision.param_dtype=bf16"]
    out["fsdp_zero3/bf16+param_fp16"] = ["+recipe=fsdp_zero3", "precision=bf16",
                                         "precision.param_dtype=fp16"]
    return out


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("precision")
    (root / "pairs.json").write_text(json.dumps(pairs()))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(REPO / "tests" / "distributed" / "precision_matrix.py"), str(root / "out.json"),
         str(root / "pairs.json")],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=540)  # inside pytest-timeout's 600 s, which covers this fixture too
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((root / "out.json").read_text())


def test_every_pair_trains_or_is_refused_with_its_reason(matrix) -> None:
    refused = {name: r["rejected"] for name, r in matrix.items() if "rejected" in r}
    assert sorted(refused) == sorted(REFUSED)
    for name, reason in REFUSED.items():
        assert reason in refused[name], (name, refused[name])
    for name, r in matrix.items():
        if name not in refused:
            assert r["losses"][-1] < r["losses"][0] - 0.05, (name, r["losses"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mixed_precision_computes_in_its_format_and_changes_the_losses(matrix, strategy) -> None:
    fp32 = matrix[f"{strategy}/fp32"]["losses"]
    for precision, dtype in LOW.items():
        r = matrix.get(f"{strategy}/{precision}", {})
        if "rejected" in r:
            continue
        assert r["dtypes"]["attention"] == dtype, (precision, r["dtypes"])
        if precision == "fp32":
            continue
        diff = max(abs(a - b) for a, b in zip(r["losses"], fp32, strict=True))
        assert LOWER < diff < UPPER, (precision, diff)


@pytest.mark.parametrize("strategy", FP16_RUNS)
def test_fp16_skips_a_non_finite_step_and_counts_it(matrix, strategy) -> None:
    r, clean = matrix[f"{strategy}/fp16+inf"], matrix[f"{strategy}/fp16"]
    assert r["last"] == {"loss_scale": 32768.0, "overflow_steps": 1.0}  # 65536 halved once
    assert clean["last"] == {"loss_scale": 65536.0, "overflow_steps": 0.0}
    sums = r["c_attn_sums"]  # sums[k]: the weights step k + 1's forward saw
    for k in range(1, len(sums)):  # step k changed the weights unless it was skipped
        assert (sums[k] == sums[k - 1]) == (k == INF_STEP), (k, sums)
    assert clean["c_attn_sums"][INF_STEP] != clean["c_attn_sums"][INF_STEP - 1]


def test_fsdp_param_and_reduce_dtypes(matrix) -> None:
    assert matrix["fsdp_zero3/bf16+reduce_bf16"]["dtypes"]["attention"] == "bfloat16"
    # fp32 master weights, gathered and computed in bf16
    assert matrix["fsdp_zero2/fp32+param_bf16"]["dtypes"]["attention"] == "bfloat16"
