"""A transformers Llama cut into pipeline stages in place (models/pipeline.py says which blocks
each stage holds): the rank's model keeps the blocks of its stages and, with the first stage,
the embedding, with the last, the final norm and the head; every other block becomes an empty
module, so each parameter keeps its name (checkpoints and export work across layouts).

With one stage per rank the model itself is the stage (its forward becomes the stage's part of
Llama's); with several (interleaved schedules) each stage is a `StageChunk` over the model's
own modules, sharing their parameters.
"""

from __future__ import annotations

import types
from collections.abc import Sequence

import torch
from torch import nn

from orchestrator.models.pipeline import stage_blocks


def _forward(config: object, rotary: nn.Module, embed: nn.Module | None,
             blocks: Sequence[nn.Module], norm: nn.Module | None, head: nn.Module | None,
             x: torch.Tensor, seq_split: int) -> torch.Tensor:
    """Llama's forward through `blocks`: token ids in when `embed` is given, hidden states
    otherwise (under tensor parallelism this rank's slice, 1/`seq_split` of the sequence);
    logits out when `norm` and `head` are, hidden states otherwise."""
    from transformers.masking_utils import create_causal_mask

    h = embed(x) if embed is not None else x
    seq = h.shape[1] * (1 if embed is not None else seq_split)
    positions = torch.arange(seq, device=h.device).unsqueeze(0)
    mask = create_causal_mask(config=config, inputs_embeds=h, attention_mask=None, cache=None,
                              position_ids=positions)
    position_embeddings = rotary(h, position_ids=positions)
    for block in blocks:
        h = block(h, attention_mask=mask, position_ids=positions,
                  position_embeddings=position_embeddings)
    return head(norm(h)) if norm is not None and head is not None else h


def _model_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    inner = self.model
    return _forward(self.config, inner.rotary_emb, inner.embed_tokens,
                    [inner.layers[i] for i in self._stage_blocks], inner.norm, self.lm_head, x,
                    self._seq_split)


def prune(model: nn.Module, held: Sequence[int], stages: int, seq_split: int = 1) -> None:
    """Keep the blocks (and root parts) of stages `held` of `stages`; with one stage held, the
    model's forward becomes that stage's (`seq_split`: the tensor-parallel degree, whose ranks
    pass each other stage's slices of the sequence)."""
    inner = model.model
    split = stage_blocks(len(inner.layers), stages)
    kept = sorted(i for k in held for i in split[k])
    for i in range(len(inner.layers)):
        if i not in kept:
            inner.layers[i] = nn.Identity()
    if 0 not in held:
        inner.embed_tokens = None
    if stages - 1 not in held:
        inner.norm, model.lm_head = None, None
    model._stage_blocks, model._seq_split = kept, seq_split
    if len(held) == 1:
        model.forward = types.MethodType(_model_forward, model)


class StageChunk(nn.Module):
    """Stage `stage` of `stages` over a pruned model's own modules (parameters shared)."""

    def __init__(self, model: nn.Module, stage: int, stages: int) -> None:
        super().__init__()
        inner, last = model.model, stage == stages - 1
        self.config = model.config
        self.rotary_emb = inner.rotary_emb
        self.embed_tokens = inner.embed_tokens if stage == 0 else None
        self.layers = nn.ModuleList(
            inner.layers[i] for i in stage_blocks(len(inner.layers), stages)[stage])
        self.norm = inner.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.seq_split = model._seq_split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _forward(self.config, self.rotary_emb, self.embed_tokens, self.layers,
                        self.norm, self.lm_head, x, self.seq_split)
