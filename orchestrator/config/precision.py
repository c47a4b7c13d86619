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
- `fp8` off CUDA, on a GPU below compute capability 8.9, or for GPT-2:
  orchestrator/quantization/fp8.py (run with the other model converters' checks).
- `precision.param_dtype` / `reduce_dtype` other than auto outside FSDP2 (DDP and ZeRO-1 use
  autocast, DeepSpeed its own fp16/bf16 sections); an fp16 `param_dtype` without
  `precision=fp16` (fp16 gradients need the loss scaler that precision brings).
- bf16 on a GPU without bf16.
- `debug.inf_grad_at_step` unless fp16: only the fp16 loss scaler skips a non-finite step.
- `precision.qat` (int8 QAT): orchestrator/quantization/checks.py.
"""

from __future__ import annotations

from orchestrator.common.errors import ConfigError
from orchestrator.config.derived import Hardware
from orchestrator.config.schema import JobConfig


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
    fsdp = backend == "torch" and job.parallelism.zero_stage >= 2
    for key in ("param_dtype", "reduce_dtype"):
        value = getattr(p, key)
        if value != "auto" and not fsdp:
            raise ConfigError(f"precision.{key}", value, "'auto' unless FSDP2 "
                              "(parallelism.zero_stage 2 or 3, backend=torch): DDP and ZeRO-1 "
                              "use autocast, DeepSpeed its own fp16/bf16 sections")
    if p.fp8_all_gather and not (p.name == "fp8" and fsdp):
        raise ConfigError("precision.fp8_all_gather", True, "false unless precision=fp8 under "
                          "FSDP2 (parallelism.zero_stage 2 or 3, backend=torch): it all-gathers "
                          "FSDP2's float8 weight shards")
    if p.param_dtype == "fp16" and p.name != "fp16":
        raise ConfigError("precision.param_dtype", "fp16", "'auto', 'fp32' or 'bf16' unless "
                          "precision=fp16 (fp16 gradients need its loss scaler)")
    if job.debug.inf_grad_at_step is not None and p.name != "fp16":
        raise ConfigError("debug.inf_grad_at_step", job.debug.inf_grad_at_step, "unset unless "
                          "precision=fp16 (only the fp16 loss scaler skips a non-finite step)")
    if local and device == "cuda" and hw.cuda_devices and p.name == "bf16" \
            and not hw.bf16_supported:
        raise ConfigError("precision.name", "bf16", "'fp16' or 'fp32' (this GPU has no bf16)")
