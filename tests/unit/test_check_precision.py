"""Precision rules before launch (issue 15): fp8 only where float8 tensor cores exist and the
model has nn.Linear layers, FSDP2-only dtype keys; the plan uses the fp8 peak. And torchao's
float8 conversion itself, on CPU (torch has a CPU `_scaled_mm`, so the code path runs here;
the speed is the GPU check's)."""

from __future__ import annotations

import pytest
import torch

from orchestrator.common.errors import ConfigError
from orchestrator.config.derived import Hardware
from orchestrator.config.gpus import GPUS
from orchestrator.models.build import build_model
from orchestrator.planning.plan import make_plan
from orchestrator.planning.preflight import validate
from orchestrator.quantization.fp8 import to_float8
from tests.conftest import make_job, run_cli

H100 = ["cluster.device=cuda", "cluster.gpu=h100", "cluster.gpus_per_node=8", "action=plan"]
LLAMA_FP8 = ["+recipe=fsdp_zero3", "model=llama_tiny", "precision=fp8"]


def refused(overrides: list[str], hw: Hardware | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        validate(make_job(overrides), hw or Hardware())
    return str(e.value)


def test_fp8_is_planned_for_an_h100_against_its_bf16_peak() -> None:
    """MFU against the bf16 peak: attention, norms and the head stay bf16, and the fp8 rows
    then show what fp8 gains against the dense bf16 work."""
    job = make_job([*LLAMA_FP8, *H100])
    validate(job, Hardware())
    plan = make_plan(job, "cuda", 8)
    assert plan.precision == "fp8"
    assert plan.compute.peak_flops_per_device == GPUS["h100"].bf16 < GPUS["h100"].fp8


def test_fp8_all_gather_is_fsdp2_only_and_planned_in_one_byte() -> None:
    base = make_plan(make_job([*LLAMA_FP8, *H100]), "cuda", 8)
    job = make_job([*LLAMA_FP8, *H100, "precision.fp8_all_gather=true"])
    validate(job, Hardware())
    gathered = make_plan(job, "cuda", 8)
    assert gathered.memory.working_set_bytes < base.memory.working_set_bytes
    with pytest.raises(ConfigError, match=r"'precision.fp8_all_gather' has value True; allowed: "
                                          r"false unless precision=fp8 under FSDP2"):
        validate(make_job(["+recipe=ddp", "model=llama_tiny", "precision=fp8", *H100,
                           "precision.fp8_all_gather=true"]), Hardware())


def test_fp8_refusals_name_the_reason() -> None:
    assert "fp8 needs a CUDA GPU of compute capability >= 8.9 (H100, H200, L4 or newer); " \
        "this GPU has 8.0" in refused(
            [*LLAMA_FP8, "cluster.device=cuda", "cluster.gpus_per_node=1", "action=run"],
            Hardware(cuda_devices=1, bf16_supported=True, capability=(8, 0)))
    validate(make_job([*LLAMA_FP8, "cluster.device=cuda", "cluster.gpus_per_node=1"]),
             Hardware(cuda_devices=1, bf16_supported=True, capability=(9, 0)))  # an H100 here
    assert "on cluster.gpu=a100_80gb: fp8 needs" in refused(
        [*LLAMA_FP8, "cluster.device=cuda", "cluster.gpu=a100_80gb", "action=plan"])
    assert "for model.family=gpt2: its Conv1D layers are not nn.Linear" in refused(
        ["+recipe=fsdp_zero3", "precision=fp8", *H100])
    assert "with DeepSpeed (torchao's float8 training" in refused(
        ["+recipe=deepspeed_zero3", "model=llama_tiny", "precision=fp8", *H100])


def test_fp8_on_cpu_exits_2_with_one_line(tmp_path) -> None:
    proc = run_cli([*LLAMA_FP8, "action=validate"], tmp_path / "run")
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: config key 'precision.name' has value 'fp8'; allowed: 'bf16' on CPU: fp8 needs "
        "a CUDA GPU of compute capability >= 8.9 (H100, H200, L4 or newer), and cluster.device "
        "is cpu\n")


def test_float8_conversion_swaps_the_linear_layers_and_still_trains() -> None:
    job = make_job(["model=llama_tiny", "model.d_model=128", "model.d_ff=256"])
    model = build_model(job.model, seed=0, device="cpu")
    reference = build_model(job.model, seed=0, device="cpu")
    # 2 layers x (q, k, v, o, gate, up, down); the output head keeps bf16 logits
    assert to_float8(model, "all") == 14  # tiny layers: torchao's own filter keeps them
    assert type(model.lm_head) is torch.nn.Linear
    ids = torch.randint(0, job.model.vocab_size, (2, 32),
                        generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
        want = reference(input_ids=ids, labels=ids).loss
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    # float8 rounding changes the loss, but not by much (measured: 6.9e-4 of 6.246 here)
    assert 1e-6 < abs(loss.item() - want.item()) < 0.05 * want.item()


def test_deepspeed_fp16_is_refused_on_a_cpu_without_onednn_fp16() -> None:
    ds_fp16 = ["+recipe=deepspeed_zero3", "precision=fp16", "action=run"]
    assert refused(ds_fp16, Hardware(cpu_fp16=False)) == (
        "config key 'precision.name' has value 'fp16'; allowed: 'fp32' or 'bf16' with DeepSpeed "
        "on this CPU (DeepSpeed's CPU accelerator runs fp16 only with oneDNN's fp16 kernels, "
        "which this CPU lacks), or fp16 under DDP or FSDP2 (backend=torch)")
    validate(make_job(ds_fp16), Hardware(cpu_fp16=True))
    validate(make_job(["+recipe=fsdp_zero3", "precision=fp16", "action=run"]),
             Hardware(cpu_fp16=False))  # torch's own fp16 needs no oneDNN fp16
    for other in (["action=plan"], ["launcher=slurm"], ["cluster.device=cuda", "action=plan"]):
        validate(make_job([*ds_fp16, *other]), Hardware(cpu_fp16=False))  # not this CPU's run


def test_deepspeed_fp16_here_follows_this_cpu(tmp_path) -> None:
    """DeepSpeed is asked about this very CPU, and agrees with the oneDNN check DeepSpeed's CPU
    accelerator makes: here either the launch is refused in one line, or the job is valid."""
    has_fp16 = torch.ops.mkldnn._is_mkldnn_fp16_supported()  # what DeepSpeed's accelerator reads
    assert Hardware().deepspeed_cpu_fp16() is has_fp16
    if has_fp16:
        validate(make_job(["+recipe=deepspeed_zero3", "precision=fp16"]), Hardware())
        return
    proc = run_cli(["+recipe=deepspeed_zero3", "precision=fp16", "model=gpt2_tiny"],
                   tmp_path / "run")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: config key 'precision.name' has value 'fp16'; "
                                  "allowed: 'fp32' or 'bf16' with DeepSpeed on this CPU")
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "run").exists()
