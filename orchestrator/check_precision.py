"""Which precision runs where. Every precision × strategy × device pair either trains or is
refused here, before launch, with the reason (docs/precision.md lists the refused pairs):

- `bf16_pure` under DeepSpeed: DeepSpeed always keeps an fp32 master copy.
- `fp16` and `bf16` under DeepSpeed stage 0: DeepSpeed 0.19's stage-0 wrapper
  (`FP16_UnfusedOptimizer`) never scales the fp16 loss yet unscales the gradients (updates
  65536 times too small; upstream PR #8393), and takes one Adam step on zero gradients while
  it is built (both formats). DDP is the same strategy and runs both correctly.
- `fp16` under DeepSpeed on a CPU without oneDNN's fp16 kernels (AVX512-FP16 / AMX-FP16), for a
  local run: DeepSpeed's CPU accelerator refuses it inside `deepspeed.initialize`, on every
  rank. CPUs of one machine kind differ, so DeepSpeed itself is asked (`Hardware`).
- `fp8` under DeepSpeed: torchao's float8 training swaps modules DeepSpeed does not know.
- `fp8` off CUDA, or on a GPU below compute capability 8.9 (no float8 tensor cores), or for
  GPT-2, whose transformers `Conv1D` layers are not `nn.Linear` (none would be converted).
- `precision.param_dtype` / `reduce_dtype` other than auto outside FSDP2 (DDP and ZeRO-1 use
  autocast, DeepSpeed its own fp16/bf16 sections); an fp16 `param_dtype` without
  `precision=fp16` (fp16 gradients need the loss scaler that precision brings).
- bf16 on a GPU without bf16.
- `debug.inf_grad_at_step` unless fp16: only the fp16 loss scaler skips a non-finite step.
- `precision.qat` (int8 QAT, orchestrator/qat.py) under DeepSpeed (its engine flattens the
  parameters and its ZeRO-3 gathers them itself: neither is tested with torchao's fake-quantized
  layers, and the end-of-run convert needs the full state dict the torch strategies give); with
  `bf16_pure` (untested: the weights QAT rounds would themselves be bf16) or `fp8` (both swap
  the same linear layers); on a task other than training (`train.task=pretrain`, which also
  fine-tunes); with LoRA (the frozen base weights are what QAT would round, and peft wraps the
  fake-quantized layers; untested) or DPO (a reference copy); without a held-out set
  (`eval.holdout` 0 and no `eval.path`: the report's perplexities need one); for a model other
  than GPT-2 or Llama (causal LMs, what the int8 convert and its report are built for).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.errors import ConfigError
from orchestrator.gpus import GPUS
from orchestrator.schema import JobConfig

if TYPE_CHECKING:
    from orchestrator.validate import Hardware

FP8_CAPABILITY = (8, 9)  # Ada / Hopper and newer: float8 tensor cores (torch._scaled_mm)
FP8_GPUS = "H100, H200, L4 or newer"


def check_precision(job: JobConfig, device: str, hw: Hardware) -> None:
    """Refuse a precision the strategy or device cannot run (one line, exit 2). The GPU's
    compute capability is checked where it is known: the table's `cluster.gpu`, and the GPUs
    here for a local run."""
    p, backend = job.precision, job.parallelism.backend
    if backend == "deepspeed" and p.name in ("bf16_pure", "fp8"):
        why = ("it always keeps an fp32 master copy" if p.name == "bf16_pure" else
               "torchao's float8 training runs under DDP, ZeRO-1 and FSDP2")
        raise ConfigError("precision.name", p.name, f"'fp32', 'bf16' or 'fp16' with DeepSpeed "
                          f"({why})")
    if backend == "deepspeed" and job.parallelism.zero_stage == 0 and p.name in ("fp16", "bf16"):
        raise ConfigError("precision.name", p.name, "'fp32' with DeepSpeed stage 0, or the same "
                          f"{p.name} under DDP (+recipe=ddp): DeepSpeed's stage-0 fp16/bf16 "
                          "optimizer wrapper mis-scales its updates (deepspeed PR #8393)")
    local = job.action == "run" and job.launcher.name == "local"
    if local and device == "cpu" and backend == "deepspeed" and p.name == "fp16" \
            and not hw.deepspeed_cpu_fp16():
        raise ConfigError("precision.name", "fp16", "'fp32' or 'bf16' with DeepSpeed on this "
                          "CPU (DeepSpeed's CPU accelerator runs fp16 only with oneDNN's fp16 "
                          "kernels, which this CPU lacks), or fp16 under DDP or FSDP2 "
                          "(backend=torch)")
    if p.name == "fp8":
        _check_fp8(job, device, hw)
    if p.qat != "none":
        _check_qat(job)
    fsdp = backend == "torch" and job.parallelism.zero_stage >= 2
    for key in ("param_dtype", "reduce_dtype"):
        value = getattr(p, key)
        if value != "auto" and not fsdp:
            raise ConfigError(f"precision.{key}", value, "'auto' unless FSDP2 "
                              "(parallelism.zero_stage 2 or 3, backend=torch): DDP and ZeRO-1 "
                              "use autocast, DeepSpeed its own fp16/bf16 sections")
    if p.param_dtype == "fp16" and p.name != "fp16":
        raise ConfigError("precision.param_dtype", "fp16", "'auto', 'fp32' or 'bf16' unless "
                          "precision=fp16 (fp16 gradients need its loss scaler)")
    if job.debug.inf_grad_at_step is not None and p.name != "fp16":
        raise ConfigError("debug.inf_grad_at_step", job.debug.inf_grad_at_step, "unset unless "
                          "precision=fp16 (only the fp16 loss scaler skips a non-finite step)")
    if local and device == "cuda" and hw.cuda_devices and p.name == "bf16" \
            and not hw.bf16_supported:
        raise ConfigError("precision.name", "bf16", "'fp16' or 'fp32' (this GPU has no bf16)")


def _check_fp8(job: JobConfig, device: str, hw: Hardware) -> None:
    need = f"a CUDA GPU of compute capability >= 8.9 ({FP8_GPUS})"
    if device != "cuda":
        raise ConfigError("precision.name", "fp8", f"'bf16' on CPU: fp8 needs {need}, and "
                          "cluster.device is cpu")
    if job.model.family == "gpt2":
        raise ConfigError("precision.name", "fp8", "'bf16' for model.family=gpt2: its Conv1D "
                          "layers are not nn.Linear, so torchao's float8 training would convert "
                          "none (use a Llama-family model)")
    gpu = GPUS.get(job.cluster.gpu)
    if gpu is not None and gpu.fp8 is None:
        raise ConfigError("precision.name", "fp8", f"'bf16' on cluster.gpu={job.cluster.gpu}: "
                          f"fp8 needs {need}")
    local = job.action == "run" and job.launcher.name == "local"
    if local and hw.cuda_devices and hw.capability < FP8_CAPABILITY:
        have = ".".join(map(str, hw.capability))
        raise ConfigError("precision.name", "fp8", f"'bf16' here: fp8 needs {need}; this "
                          f"GPU has {have}")


def _check_qat(job: JobConfig) -> None:
    from orchestrator.quantize_config import FAMILIES, model_family

    p, value = job.precision, job.precision.qat
    if job.parallelism.backend == "deepspeed":
        raise ConfigError("precision.qat", value, "'none' with DeepSpeed: int8 QAT runs under "
                          "DDP, ZeRO-1 and FSDP2 (backend=torch), whose full state dict the "
                          "end-of-run int8 convert reads")
    if p.name in ("bf16_pure", "fp8"):
        why = ("fp8 swaps the same linear layers for float8 ones" if p.name == "fp8" else
               "untested: the weights QAT rounds would themselves be bf16")
        raise ConfigError("precision.qat", value, f"'none' with precision={p.name} ({why}); "
                          "use fp32, bf16 or fp16")
    if job.train.task != "pretrain":
        raise ConfigError("precision.qat", value, f"'none' for train.task={job.train.task} "
                          "(QAT is a way of training: pre-training or fine-tuning; +recipe="
                          "quantize is post-training quantization)")
    if job.lora.rank > 0:
        raise ConfigError("precision.qat", value, "'none' with lora.rank > 0 (LoRA + QAT is "
                          "not supported: train every weight, or quantize the merged model "
                          "with +recipe=quantize)")
    if job.dpo_beta is not None:
        raise ConfigError("precision.qat", value, "'none' for DPO (not supported: its frozen "
                          "reference copy would be fake-quantized too)")
    if job.eval.holdout == 0 and job.eval.path is None:
        raise ConfigError("eval.holdout", 0.0, "a fraction in (0, 1) with precision.qat (the "
                          "report measures held-out perplexity before and after the int8 "
                          "convert; +recipe=finetune holds none out by default), or set "
                          "eval.path")
    family = model_family(job)
    if family not in FAMILIES:
        raise ConfigError("precision.qat", value, f"'none' for model family {family} (int8 "
                          "QAT is built for the causal LMs gpt2 and llama)")
