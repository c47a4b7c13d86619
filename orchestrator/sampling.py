"""Text generation by weighted-random sampling (the seed lecture's decoding): temperature
rescales the logits, top-k and top-p (nucleus) cut the candidates, and a seeded generator draws
the next token. Temperature 0 is greedy decoding."""

from __future__ import annotations

import torch
from torch import nn


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               g: torch.Generator) -> int:
    """Pick one token id from a 1-D vector of logits."""
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        order = torch.argsort(logits, descending=True)
        probs = torch.softmax(logits[order], dim=-1)
        outside = torch.cumsum(probs, dim=-1) - probs >= top_p  # keep the smallest nucleus
        logits[order[outside]] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=g))


@torch.no_grad()
def generate(model: nn.Module, prompt: list[int], max_new_tokens: int, temperature: float,
             top_k: int, top_p: float, g: torch.Generator, eos_id: int | None = None,
             max_len: int | None = None) -> list[int]:
    """Continue `prompt` token by token; stops at `eos_id` or after `max_new_tokens`."""
    model.eval()
    device = next(model.parameters()).device
    ids = list(prompt)
    for _ in range(max_new_tokens):
        window = ids[-max_len:] if max_len else ids
        logits = model(input_ids=torch.tensor([window], device=device)).logits[0, -1]
        token = next_token(logits, temperature, top_k, top_p, g)
        ids.append(token)
        if token == eos_id:
            break
    return ids[len(prompt):]
