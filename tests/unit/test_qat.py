"""int8 quantization-aware training (quantization/qat.py) in-process: prepare on real and
meta-device models, the fake-quantized weight against a hand computation, convert, the
planner's QAT overhead and the config checks. The 2-rank CLI runs are in
tests/distributed/test_qat.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orchestrator.common.errors import ConfigError
from orchestrator.config.derived import Hardware
from orchestrator.models.build import build_model
from orchestrator.planning.plan import make_plan
from orchestrator.planning.preflight import validate
from orchestrator.quantization.int8 import QAT_FLOPS_PER_WEIGHT
from orchestrator.quantization.ptq import conv1d_to_linear, is_quantized, linear_weight_bytes
from orchestrator.quantization.qat import convert, prepare, ptq
from tests.conftest import make_job
from tests.unit.test_quantize import EXPECTED

# gpt2_tiny's linear weights, counted by hand in tests/unit/test_quantize.py (fp32 bytes / 4)
GPT2_LINEAR_WEIGHTS = EXPECTED["gpt2"][0] // 4


def fake_quantizer_linears(model: nn.Module) -> list[str]:
    from torchao.quantization.qat import FakeQuantizedLinear

    return [n for n, m in model.named_modules() if isinstance(m, FakeQuantizedLinear)]


def hand_int8(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per output row, worked out independently of torchao: scale = max|w| /
    127.5 (the int8 range's half width), q = clamp(round(w * (1 / scale)), -128, 127)."""
    scale = w.abs().amax(dim=1, keepdim=True) / 127.5
    return torch.clamp(torch.round(w * (1.0 / scale)), -128, 127) * scale


def test_prepare_rounds_the_weight_in_forward_and_convert_stores_exactly_that() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(4, 64)
    plain = model(x)
    assert prepare(model) == 2
    want = hand_int8(model[0].weight.detach())
    assert not torch.equal(want, model[0].weight)
    assert torch.equal(model[0].weight_fake_quantizer(model[0].weight).detach(), want)
    trained = model(x)
    assert not torch.equal(trained, plain)  # the forward multiplies by the rounded weights
    # gradients pass straight through the rounding to the fp32 weights
    trained.sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    convert(model)
    assert is_quantized(model[0].weight) and not fake_quantizer_linears(model)
    assert torch.equal(model[0].weight.dequantize(), want)
    with torch.no_grad():
        assert torch.equal(model(x), trained.detach())  # int8 model = what was trained


def test_prepare_keeps_names_and_shapes_and_works_on_the_meta_device() -> None:
    job = make_job(["model=gpt2_tiny"])
    plain = build_model(job.model, seed=0)
    conv1d_to_linear(plain)
    want = {k: v.shape for k, v in plain.state_dict().items()}
    for device in ("cpu", "meta"):
        model = build_model(job.model, seed=0, device=device)
        assert prepare(model) == 8  # the tied head stays the embedding, unprepared
        assert {k: v.shape for k, v in model.state_dict().items()} == want
        assert model.lm_head.weight is model.transformer.wte.weight
        assert model.transformer.h[0].attn.c_attn.weight.device.type == device


def test_ptq_with_qats_scheme_gives_the_same_bytes() -> None:
    model = build_model(make_job(["model=gpt2_tiny"]).model, seed=0)
    ptq(model)
    assert linear_weight_bytes(model) == (EXPECTED["gpt2"][1], EXPECTED["gpt2"][2])


def test_the_plan_counts_qats_fake_quantized_copies_and_flops() -> None:
    base = ["+recipe=causal_lm", "model=gpt2_tiny", "action=plan", "train.micro_batch_size=4",
            "data.seq_len=64"]
    plain, qat = (make_plan(make_job(o), "cpu", 2) for o in (base, [*base, "precision.qat=int8"]))
    extra = qat.memory.activations_bytes - plain.memory.activations_bytes
    assert extra == 4 * GPT2_LINEAR_WEIGHTS  # one fp32 fake-quantized copy per linear weight
    flops = qat.compute.flops_per_token - plain.compute.flops_per_token
    assert flops == pytest.approx(QAT_FLOPS_PER_WEIGHT * GPT2_LINEAR_WEIGHTS / (4 * 64))
    assert flops < 0.01 * plain.compute.flops_per_token  # small beside the matmuls
    assert qat.quantize is not None and qat.quantize["method"] == "qat_int8"
    assert qat.quantize["linear_int8_bytes"] == EXPECTED["gpt2"][1]


CAUSAL = "+recipe=causal_lm"


@pytest.mark.parametrize("overrides, reason", [
    (["+recipe=deepspeed_zero3"], "DeepSpeed"),
    ([CAUSAL, "precision=bf16_pure"], "bf16_pure"),
    ([CAUSAL, "precision=fp8", "model=llama_tiny", "cluster.device=cuda"], "fp8"),
    (["+recipe=evaluate"], "train.task=evaluate"),
    ([CAUSAL, "lora.rank=4"], "lora"),
    ([CAUSAL, "model=bert_tiny"], "bert"),
    (["+recipe=finetune"], "eval.holdout"),
])
def test_qat_is_refused_where_it_does_not_run(overrides: list[str], reason: str) -> None:
    job = make_job([*overrides, "precision.qat=int8"])
    with pytest.raises(ConfigError) as err:
        validate(job, Hardware())
    assert "precision.qat" in str(err.value) and reason in str(err.value), str(err.value)
    assert "\n" not in str(err.value)  # one line


def test_qat_is_accepted_under_ddp_zero1_and_fsdp2() -> None:
    for strategy in ("ddp", "zero1", "zero2", "zero3"):
        validate(make_job(["+recipe=causal_lm", f"parallelism={strategy}",
                           "precision.qat=int8"]), Hardware())
