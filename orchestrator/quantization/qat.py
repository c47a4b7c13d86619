"""int8 quantization-aware training (QAT, `precision.qat=int8`) with torchao's `QATConfig`.

`prepare` runs in every rank after the model is built and before the strategy wraps it
(run/converters.py): GPT-2's `Conv1D` layers become `nn.Linear` (`ptq.conv1d_to_linear`),
then every linear layer but a head tied to the input embedding becomes torchao's
`FakeQuantizedLinear`, whose forward multiplies by its weight rounded to int8 per output row,
symmetric (the rounding passes gradients straight through). The fake quantizers hold no tensors,
so parameter names and shapes stay those of the plain `nn.Linear`s: DDP's broadcast from rank
0, FSDP2's sharding and rank-0 copy, and checkpoints work unchanged (ranks other than 0 prepare
their meta-device model just the same).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from orchestrator.quantization.ptq import (
    _targets,
    conv1d_to_linear,
    torchao,
)


def base_config() -> Any:
    """The int8 scheme QAT simulates and converts to: weight-only, symmetric, per output row."""
    torchao()
    from torchao.quantization import IntxWeightOnlyConfig, PerAxis

    return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))


def _apply(model: nn.Module, config: Any) -> None:
    from torchao.quantization import quantize_

    quantize_(model, config, filter_fn=_targets(model))


def prepare(model: nn.Module) -> int:
    """Swap the linear layers for fake-quantized ones in place; returns how many."""
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    conv1d_to_linear(model)
    _apply(model, QATConfig(base_config(), step="prepare"))
    return sum(isinstance(m, FakeQuantizedLinear) for m in model.modules())


def convert(model: nn.Module) -> None:
    """A prepared (unwrapped, unsharded) model to int8 in place."""
    from torchao.quantization.qat import QATConfig

    _apply(model, QATConfig(base_config(), step="convert"))


def ptq(model: nn.Module) -> None:
    """The same int8 scheme applied after training (PTQ) to a plain fp32 model, in place: what
    QAT's convert does without the training that saw the rounding."""
    conv1d_to_linear(model)
    _apply(model, base_config())
