"""LoRA fine-tuning with `peft`: the model's weights are frozen and low-rank adapters
(W + (alpha/r)·B·A) on the target projections are trained instead.

The adapters are injected before any strategy wraps the model, so DDP, ZeRO-1, FSDP2 and
DeepSpeed see an ordinary module whose frozen parameters take no gradient or optimizer state.
At the end of a run the adapters are merged into the weights (`merged_state_dict`), so the
saved `<run_dir>/model` is a plain Hugging Face model that the next lifecycle step loads; the
adapter alone is saved too, in peft's format.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from orchestrator.config.schema import LoraConfig

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"  # peft's name for the one adapter we train


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """`model` wrapped by peft with adapters on `cfg.target_modules` (empty: peft's default for
    the architecture, e.g. GPT-2 `c_attn`, Llama `q_proj`/`v_proj`, BERT `query`/`value`, T5
    `q`/`v`); only the adapters require gradients."""
    import peft

    lora = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           target_modules=list(cfg.target_modules) or None,
                           fan_in_fan_out=model.config.model_type == "gpt2")  # Conv1D: in x out
    with warnings.catch_warnings():  # peft asks transformers a deprecated question
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return peft.get_peft_model(model, lora)


def is_lora(model: nn.Module) -> bool:
    import peft

    return isinstance(model, peft.PeftModel)


def _lora_layers(model: nn.Module) -> dict[str, tuple[float, bool]]:
    """Module name (without peft's prefix) → (scaling, fan_in_fan_out) of each adapted layer."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            out[name.removeprefix(PEFT_PREFIX)] = (module.scaling[ADAPTER],
                                                   bool(getattr(module, "fan_in_fan_out", False)))
    return out


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter folded into its weight:
    W' = W + scaling·B·A (transposed for GPT-2's Conv1D, which stores W as in × out).

    `model` is the (possibly sharded) peft model: only its layer metadata is read, so this works
    on a full state dict gathered from any strategy."""
    layers = _lora_layers(model)
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        if ".lora_" in name:
            continue
        merged[name.replace(".base_layer.", ".")] = value
    for name, (scaling, fan_in_fan_out) in layers.items():
        a = state[f"{PEFT_PREFIX}{name}.lora_A.{ADAPTER}.weight"].float()
        b = state[f"{PEFT_PREFIX}{name}.lora_B.{ADAPTER}.weight"].float()
        delta = (b @ a) * scaling
        weight = merged[f"{name}.weight"]
        if fan_in_fan_out:
            delta = delta.T
        merged[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype)
    return merged
