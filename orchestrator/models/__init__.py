"""Decoder-only causal LMs built from Hugging Face `transformers` config classes.

Random initialisation under a fixed seed; `param_specs` builds the same model on the meta
device so the planner can count parameters and shard shapes without allocating anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from orchestrator.schema import ModelConfig

ROOT_GROUP = "root"


def hf_config(cfg: ModelConfig):  # noqa: ANN201 - a transformers PretrainedConfig
    from transformers import GPT2Config, LlamaConfig

    common = dict(vocab_size=cfg.vocab_size, bos_token_id=0, eos_token_id=0,
                  tie_word_embeddings=cfg.tie_embeddings)
    if cfg.family == "gpt2":
        hf = GPT2Config(
            n_layer=cfg.n_layer, n_embd=cfg.d_model, n_head=cfg.n_head, n_inner=cfg.d_ff,
            n_positions=cfg.max_seq_len, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout, **common,
        )
    elif cfg.family == "llama":
        extra = {"intermediate_size": cfg.d_ff} if cfg.d_ff else {}
        hf = LlamaConfig(
            num_hidden_layers=cfg.n_layer, hidden_size=cfg.d_model,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_kv_head or cfg.n_head,
            max_position_embeddings=cfg.max_seq_len, attention_dropout=cfg.dropout,
            pad_token_id=0, **extra, **common,
        )
    else:  # validate() rejects this first; kept for direct callers
        raise ValueError(f"unknown model family {cfg.family!r}")
    hf._attn_implementation = cfg.attn_implementation
    return hf


def build_model(cfg: ModelConfig, seed: int, device: str | torch.device = "cpu") -> nn.Module:
    """A randomly initialised causal LM; the same seed gives the same weights on every rank."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(cfg))
    model.loss_type = "ForCausalLM"  # shifted next-token cross-entropy, named explicitly
    return model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder layers (the FSDP wrapping unit)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == model.config.num_hidden_layers:
            return list(module)
    n = model.config.num_hidden_layers
    raise ValueError(f"no list of {n} blocks in {type(model).__name__}")


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    group: str  # FSDP unit: "block.<i>" or "root"
    head: bool = False  # the output projection (tied embeddings: the shared weight)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """Unique trainable parameters (tied weights once), in `model.parameters()` order."""
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(hf_config(cfg))
    owner: dict[int, str] = {}
    for i, block in enumerate(transformer_blocks(model)):
        for p in block.parameters():
            owner[id(p)] = f"block.{i}"
    head = model.get_output_embeddings().weight
    return [
        ParamSpec(name, tuple(p.shape), owner.get(id(p), ROOT_GROUP), head=p is head)
        for name, p in model.named_parameters()
        if p.requires_grad
    ]
