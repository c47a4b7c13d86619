"""A transformers Llama or GPT-2 cut into pipeline stages in place (models/pipeline.py says
which blocks each stage holds): the rank's model keeps the blocks of its stages and, with the
first stage, the embeddings, with the last, the final norm and the head; every other block
becomes an empty module, so each parameter keeps its name (checkpoints and export work across
layouts).

With one stage per rank the model itself is the stage (its forward becomes the stage's part of
the model's); with several (interleaved schedules) each stage is a `StageChunk` over the
model's own modules, sharing their parameters.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from orchestrator.models.layout import LAYOUTS, Layout
from orchestrator.models.pipeline import stage_blocks


def _layout(model: nn.Module) -> Layout:
    return LAYOUTS[model.config.model_type]



def _parts(stack: nn.Module, layout: Layout, embed: bool) -> dict[str, nn.Module]:
    """The stack's modules a stage calls besides its blocks: the shared ones, and the
    embeddings when it is the first stage."""
    names = (*layout.shared, *(layout.embeddings if embed else ()))
    return {name: getattr(stack, name) for name in names}


def _embed(parts: Mapping[str, nn.Module], x: torch.Tensor,
           positions: torch.Tensor) -> torch.Tensor:
    """The first stage's input: token embeddings (GPT-2: plus learned positions, dropout)."""
    if "wte" in parts:
        return parts["drop"](parts["wte"](x) + parts["wpe"](positions))
    return parts["embed_tokens"](x)


def _forward(config: object, parts: Mapping[str, nn.Module], blocks: Sequence[nn.Module],
             norm: nn.Module | None, head: nn.Module | None, x: torch.Tensor,
             seq_split: int) -> torch.Tensor:
    """The model's forward through `blocks`: token ids in when `parts` has the embeddings,
    hidden states otherwise (under tensor parallelism this rank's slice, 1/`seq_split` of the
    sequence); logits out when `norm` and `head` are given, hidden states otherwise."""
    from transformers.masking_utils import create_causal_mask

    embed = "wte" in parts or "embed_tokens" in parts
    seq = x.shape[1] * (1 if embed else seq_split)
    positions = torch.arange(seq, device=x.device).unsqueeze(0)
    h = _embed(parts, x, positions) if embed else x
    mask = create_causal_mask(config=config, inputs_embeds=h, attention_mask=None, cache=None,
                              position_ids=positions)
    kwargs = {"attention_mask": mask, "position_ids": positions}
    if "rotary_emb" in parts:  # Llama: rotary position embeddings, shared by the blocks
        kwargs["position_embeddings"] = parts["rotary_emb"](h, position_ids=positions)
    for block in blocks:
        h = block(h, **kwargs)
    return head(norm(h)) if norm is not None and head is not None else h


def _model_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    layout = _layout(self)
    stack = getattr(self, layout.stack)
    blocks = getattr(stack, layout.blocks)
    embed = getattr(stack, layout.embeddings[0]) is not None
    return _forward(self.config, _parts(stack, layout, embed),
                    [blocks[i] for i in self._stage_blocks], getattr(stack, layout.norm),
                    self.lm_head, x, self._seq_split)


def prune(model: nn.Module, held: Sequence[int], stages: int, seq_split: int = 1) -> None:
    """Keep the blocks (and root parts) of stages `held` of `stages`; with one stage held, the
    model's forward becomes that stage's (`seq_split`: the tensor-parallel degree, whose ranks
    pass each other stage's slices of the sequence)."""
    layout = _layout(model)
    stack = getattr(model, layout.stack)
    blocks = getattr(stack, layout.blocks)
    kept = sorted(i for k in held for i in stage_blocks(len(blocks), stages)[k])
    for i in range(len(blocks)):
        if i not in kept:
            blocks[i] = nn.Identity()
    if 0 not in held:
        for name in layout.embeddings:
            setattr(stack, name, None)
    if stages - 1 not in held:
        setattr(stack, layout.norm, None)
        model.lm_head = None
    model._stage_blocks, model._seq_split = kept, seq_split
    if len(held) == 1:
        model.forward = types.MethodType(_model_forward, model)


class StageChunk(nn.Module):
    """Stage `stage` of `stages` over a pruned model's own modules (parameters shared)."""

    def __init__(self, model: nn.Module, stage: int, stages: int) -> None:
        super().__init__()
        layout, last = _layout(model), stage == stages - 1
        stack = getattr(model, layout.stack)
        blocks = getattr(stack, layout.blocks)
        self.config = model.config
        # only this stage's modules: the zero-bubble schedules take a stage's weights from it
        self.parts = nn.ModuleDict(_parts(stack, layout, stage == 0))
        self.layers = nn.ModuleList(blocks[i] for i in stage_blocks(len(blocks), stages)[stage])
        self.norm = getattr(stack, layout.norm) if last else None
        self.lm_head = model.lm_head if last else None
        self.seq_split = model._seq_split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _forward(self.config, self.parts, self.layers, self.norm, self.lm_head, x,
                        self.seq_split)
