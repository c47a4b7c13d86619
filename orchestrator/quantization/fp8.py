"""fp8 training (`precision=fp8`): bf16 mixed precision whose linear layers are torchao's
`Float8Linear` (float8 matmuls with dynamic tensorwise scaling). `check` refuses it before launch
where float8 tensor cores or `nn.Linear` layers are missing; `to_float8` converts a model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.common.errors import ConfigError
from orchestrator.config.derived import Hardware
from orchestrator.config.gpus import GPUS
from orchestrator.config.schema import JobConfig

if TYPE_CHECKING:  # validation imports this module without importing torch
    import torch

FP8_CAPABILITY = (8, 9)  # Ada / Hopper and newer: float8 tensor cores (torch._scaled_mm)
FP8_GPUS = "H100, H200, L4 or newer"


def check(job: JobConfig, device: str, hw: Hardware) -> None:
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
    tokens = job.train.micro_batch_size * job.data.seq_len
    if tokens % 16:  # torch/_meta_registrations.py: _check_scaled_mm_sizes, CUDA only
        raise ConfigError("train.micro_batch_size", job.train.micro_batch_size,
                          "a value whose product with data.seq_len is a multiple of 16 with "
                          f"precision=fp8 (here {tokens} tokens): the weight gradient's float8 "
                          "matmul (grad_output.t() @ input) has the micro batch's tokens as "
                          "its inner dimension, which CUDA's _scaled_mm wants divisible by 16")


def to_float8(model: torch.nn.Module, which: str = "auto", all_gather: bool = False) -> int:
    """`precision=fp8`: swap the model's linear layers for torchao's `Float8Linear` (dynamic
    tensorwise scaling); returns how many were swapped. `which` (`precision.fp8_filter`):
    "auto" is torchao's own size heuristic (`_auto_filter_for_recipe`, exported by
    torchao.float8), "all" every linear whose dimensions are multiples of 16, as the float8
    kernels need. The output head is never converted (its logits stay bf16). `all_gather`:
    FSDP2 all-gathers the float8 weights (`precision.fp8_all_gather`)."""
    import torch
    from torchao.float8 import (
        Float8LinearConfig,
        _auto_filter_for_recipe,
        convert_to_float8_training,
    )
    from torchao.float8.float8_linear import Float8Linear

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = [n for n, m in model.named_modules() if m is head and head is not None]
    auto = _auto_filter_for_recipe("tensorwise", filter_fqns=head_names)

    def wanted(module: torch.nn.Module, fqn: str) -> bool:
        if which == "auto":
            return auto(module, fqn)
        return (isinstance(module, torch.nn.Linear) and module is not head
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    config = Float8LinearConfig(enable_fsdp_float8_all_gather=all_gather)
    convert_to_float8_training(model, config=config, module_filter_fn=wanted)
    return sum(isinstance(m, Float8Linear) for m in model.modules())
