"""The memory model follows the ZeRO paper's stage semantics on real parameter shapes."""

from __future__ import annotations

import pytest

from orchestrator import memory
from orchestrator.models import param_specs
from tests.conftest import make_job


@pytest.fixture(scope="module")
def gpt2_specs():
    return param_specs(make_job(["model=gpt2"]).model)


def test_ddp_holds_16_bytes_per_parameter_in_fp32(gpt2_specs) -> None:
    psi = sum(s.numel for s in gpt2_specs)
    est = memory.estimate(gpt2_specs, world_size=8, zero_stage=0, precision="fp32")
    m = est.moments["after_backward"]
    assert (m.params_bytes, m.grads_bytes) == (4 * psi, 4 * psi)
    assert m.optimizer_bytes == 8 * psi + 4 * len(gpt2_specs)  # two moments + step per tensor


def test_stages_shard_optimizer_then_gradients_then_parameters(gpt2_specs) -> None:
    n, psi = 8, sum(s.numel for s in gpt2_specs)
    est = {k: memory.estimate(gpt2_specs, n, k, "fp32").moments for k in range(4)}
    # Stage 1: only the optimizer term shrinks. ZeroRedundancyOptimizer gives whole parameters
    # to ranks, so the rank holding GPT-2's 38.6M-element embedding holds far more than 1/N.
    assert est[1]["after_backward"].params_bytes == est[0]["after_backward"].params_bytes
    assert est[1]["after_backward"].grads_bytes == est[0]["after_backward"].grads_bytes
    largest = max(s.numel for s in gpt2_specs)
    opt1 = est[1]["after_backward"].optimizer_bytes
    assert 8 * largest <= opt1 < est[0]["after_backward"].optimizer_bytes / 3
    # Stage 2: gradients are sharded too; full params are only held between fwd and bwd.
    s2 = est[2]
    assert s2["after_backward"].grads_bytes == pytest.approx(4 * psi / n, rel=0.01)
    assert s2["after_forward"].params_bytes >= 4 * psi
    # Stage 3: parameters sharded as well; after forward only the root group stays gathered.
    s3 = est[3]
    assert s3["after_forward"].params_bytes < s2["after_forward"].params_bytes / 2
    assert s3["after_backward"].total_bytes == pytest.approx(16 * psi / n, rel=0.01)
    peaks = [memory.estimate(gpt2_specs, n, k, "fp32").peak_bytes for k in range(4)]
    assert peaks == sorted(peaks, reverse=True)


def test_bf16_gathers_half_the_bytes(gpt2_specs) -> None:
    fp32 = memory.estimate(gpt2_specs, 8, 2, "fp32").moments["after_forward"]
    bf16 = memory.estimate(gpt2_specs, 8, 2, "bf16").moments["after_forward"]
    shard = memory.estimate(gpt2_specs, 8, 2, "fp32").moments["after_backward"].params_bytes
    assert bf16.params_bytes - shard == pytest.approx((fp32.params_bytes - shard) / 2, rel=1e-6)


def test_zero1_partition_is_greedy_and_complete(gpt2_specs) -> None:
    owned = memory.zero1_partition(gpt2_specs, 4)
    flat = sorted(i for rank in owned for i in rank)
    assert flat == list(range(len(gpt2_specs)))
    sizes = [sum(gpt2_specs[i].numel for i in rank) for rank in owned]
    assert max(sizes) - min(sizes) <= max(s.numel for s in gpt2_specs)


def test_uneven_dim0_is_padded_like_fsdp() -> None:
    specs = [memory.ParamSpec("w", (5, 3), "root")]
    est = memory.estimate(specs, world_size=2, zero_stage=3, precision="fp32")
    after_bwd = est.moments["after_backward"]
    assert after_bwd.params_bytes == 4 * 3 * 3  # ceil(5/2)=3 rows, padded on every rank
    assert after_bwd.optimizer_bytes == 8 * 3 * 3 + 4  # rank 0 owns 3 real rows


def test_lora_frozen_weights_hold_parameters_only() -> None:
    """With LoRA every strategy still stores (or shards) the frozen weights, but gradients and
    Adam state exist for the adapters alone; compute drops to 4N + 2T FLOPs per token."""
    from orchestrator.schema import LoraConfig

    model = make_job(["model=gpt2"]).model
    full, lora = param_specs(model), param_specs(model, LoraConfig(rank=8))
    trained = sum(s.numel for s in lora if s.trainable)
    frozen = sum(s.numel for s in lora if not s.trainable)
    assert frozen == sum(s.numel for s in full) and 0 < trained < frozen / 100
    for stage in range(4):
        a = memory.estimate(full, 8, stage, "fp32").moments["after_backward"]
        b = memory.estimate(lora, 8, stage, "fp32").moments["after_backward"]
        assert b.params_bytes >= a.params_bytes  # adapters add a little
        assert b.grads_bytes < a.grads_bytes / 50 and b.optimizer_bytes < a.optimizer_bytes / 50
    ds = memory.estimate_deepspeed(lora, 8, 3, "bf16").moments["after_backward"]
    assert ds.optimizer_bytes < 12 * trained  # master + moments for the adapters only
