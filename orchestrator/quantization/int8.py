"""Post-training quantization before launch, without torch: which int8 method a job runs its
model with (`quantize.method`, or the one a quantized model directory was saved with), the checks
that refuse a job that cannot quantize, and the quantized size the plan shows.

A quantized model runs on one process, unwrapped, in fp32: torchao's int8 tensors implement
the inference ops (linear, the copies `Module.to` makes), not what DDP, FSDP2 or DeepSpeed do
to a parameter (views into flat buffers, broadcasts, sharding), so there is nothing to shard and
no strategy to choose. The int8 weights carry fp32 scales; activations stay fp32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from orchestrator.config.schema import JobConfig
from orchestrator.models.specs import ParamSpec

METHODS = ("int8_weight_only", "int8_dynamic")
QAT_METHOD = "qat_int8"  # the marker of a model QAT converted (quantization/qat.py): int8
# weight-only per output row like int8_weight_only, as torchao's IntxUnpackedToInt8Tensor
FAMILIES = ("gpt2", "llama")  # causal LMs, what PTQ is built and tested for
MARKER = "orchestrator_quantized.json"  # in a quantized model directory: method, torchao version
WEIGHTS = "quantized.safetensors"  # not model.safetensors: a plain from_pretrained must not
# mistake the int8 tensors' flattened parts for a model's weights
# bytes torchao keeps per output row of an int8 weight: an fp32 scale and an int8 zero point
# (stored even for symmetric quantization), beside one int8 per weight
ROW_BYTES = 4 + 1
FP32_BYTES = 4
ONE_PROCESS = "cluster.gpus_per_node=1 parallelism=ddp"


def saved_marker(path: Optional[str]) -> Optional[dict[str, Any]]:
    """The marker of a quantized model directory (method, torchao version, source model); None
    for any other directory, or none at all."""
    if not path:
        return None
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    saved = (*METHODS, QAT_METHOD)
    return marker if isinstance(marker, dict) and marker.get("method") in saved else None


def saved_method(path: Optional[str]) -> Optional[str]:
    """The method a quantized model directory was saved with; None for any other directory."""
    marker = saved_marker(path)
    return None if marker is None else str(marker["method"])


def job_method(job: JobConfig) -> Optional[str]:
    """The int8 method the job's model runs with: `quantize.method`, else the method of the
    quantized directory at `model.pretrained_path`; None when the model is not quantized."""
    method = job.quantize.method
    return method if method != "none" else saved_method(job.model.pretrained_path)


def model_family(job: JobConfig) -> str:
    """The model's family: the `model_type` of a pretrained directory's config.json (what
    transformers builds from it), else `model.family`."""
    path = job.model.pretrained_path
    if path:
        try:
            return str(json.loads((Path(path) / "config.json").read_text())["model_type"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # models/check.py has refused an unreadable config.json already
    return job.model.family


@dataclass(frozen=True)
class QuantizedSize:
    """What int8 PTQ makes of a model's weights, counted from its parameter shapes."""

    method: str
    linear_layers: int  # weights quantized
    linear_fp32_bytes: int
    linear_int8_bytes: int  # int8 data + ROW_BYTES per output row
    weight_fp32_bytes: int  # every parameter (tied ones once)
    weight_int8_bytes: int  # the same with the linear weights quantized

    @property
    def linear_ratio(self) -> float:
        return self.linear_fp32_bytes / max(1, self.linear_int8_bytes)


def quantized_size(specs: list[ParamSpec], method: str) -> QuantizedSize:
    """Bytes of the linear weights and of all weights, fp32 and after int8 PTQ: each linear
    weight becomes int8 data plus an fp32 scale and an int8 zero point per output row, as
    torchao's Int8Tensor stores it; every other parameter (embeddings, norms, biases) stays
    fp32. The model's own parameters only (not a DPO reference)."""
    linear = [s for s in specs if s.out_features]
    fp32 = sum(s.numel for s in linear) * FP32_BYTES
    int8 = sum(s.numel + s.out_features * ROW_BYTES for s in linear)
    total = sum(s.numel for s in specs) * FP32_BYTES
    return QuantizedSize(method, len(linear), fp32, int8, total, total - fp32 + int8)


def plan_entry(job: JobConfig, specs: list[ParamSpec]) -> Optional[dict[str, Any]]:
    """The plan's `quantize` entry (plan.json; a row of the printed plan): the quantized size
    of the job's model (QAT: the model it converts to at the end), or None when the job does not
    quantize."""
    method = job_method(job) or (QAT_METHOD if job.precision.qat != "none" else None)
    if method is None:
        return None
    size = quantized_size(specs, method)
    return {**size.__dict__, "linear_ratio": size.linear_ratio}


# QAT's fake quantization, per weight and forward: abs-max, divide, round, clamp (2), shift,
# multiply, and the straight-through backward's one: elementwise ops counted as FLOPs
QAT_FLOPS_PER_WEIGHT = 8


def qat_overhead(job: JobConfig, specs: list[ParamSpec]) -> tuple[int, float]:
    """`precision.qat`'s (bytes, FLOPs per token) on top of plain training, for the plan.
    Bytes: every fake-quantized linear weight, fp32 and whole (computed from the gathered
    weight under FSDP2), which autograd keeps from forward until backward for the input's
    gradient: 4 bytes per linear weight, counted with the activations. Measured (saved-tensor
    hooks on a prepared nn.Linear, torch 2.13 CPU): 4.03 bytes per weight in fp32; under
    bf16/fp16 autocast the copy replaces the low-precision weight cast the plain run keeps, so
    this is an upper bound there; with activation checkpointing only the recomputed layer's
    copy is alive, so it is an upper bound there too. FLOPs: QAT_FLOPS_PER_WEIGHT per linear
    weight, once per micro batch on each rank, spread over that micro batch's tokens."""
    if job.precision.qat == "none":
        return 0, 0.0
    linear = sum(s.numel for s in specs if s.out_features)
    tokens = job.train.micro_batch_size * job.data.seq_len
    return linear * FP32_BYTES, QAT_FLOPS_PER_WEIGHT * linear / tokens
