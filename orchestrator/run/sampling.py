"""Text generation by weighted-random sampling (the seed lecture's decoding): temperature
rescales the logits, top-k and top-p (nucleus) cut the candidates, and a seeded generator draws
the next token. Temperature 0 is greedy decoding."""

from __future__ import annotations

from collections.abc import Callable

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
def generate_batch(model: nn.Module, prompts: list[list[int]], max_new_tokens: int,
                   temperature: float, top_k: int, top_p: float,
                   generators: list[torch.Generator], eos_id: int | None = None,
                   max_len: int | None = None, device: str | torch.device = "cpu",
                   all_done: Callable[[bool], bool] = bool,
                   vocab: int | None = None) -> list[list[int]]:
    """Continue every prompt at once: left-padded into one batch (attention mask, positions
    counted from each prompt's first token). Each row draws from its own generator, so a
    completion does not depend on which prompts share its batch. A row stops at `eos_id`; the
    batch stops after `max_new_tokens` or when `all_done(this batch is done)` says so (sharded
    models pass a collective here: every rank must run the same number of forwards). `vocab`
    limits sampling to the tokenizer's ids when the model's embedding table is larger."""
    model.eval()
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * n
    for _ in range(max_new_tokens):
        if max_len:
            ids, mask = ids[:, -max_len:], mask[:, -max_len:]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       position_ids=positions.to(device)).logits[:, -1, :vocab].float().cpu()
        step = torch.zeros(n, dtype=torch.long)
        for i in range(n):
            if not done[i]:
                step[i] = next_token(logits[i], temperature, top_k, top_p, generators[i])
                out[i].append(int(step[i]))
                done[i] = int(step[i]) == eos_id
        ids = torch.cat([ids, step[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(n, 1, dtype=torch.long)], dim=1)
        if all_done(all(done)):
            break
    return out


def generate(model: nn.Module, prompt: list[int], max_new_tokens: int, temperature: float,
             top_k: int, top_p: float, g: torch.Generator, eos_id: int | None = None,
             max_len: int | None = None) -> list[int]:
    """Continue one prompt token by token; stops at `eos_id` or after `max_new_tokens`."""
    device = next(model.parameters()).device
    return generate_batch(model, [prompt], max_new_tokens, temperature, top_k, top_p, [g],
                          eos_id, max_len, device)[0]
