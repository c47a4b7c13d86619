"""Pre-training objectives: turn a micro batch of token windows into model inputs and labels.

- causal LM (decoder-only): labels are the inputs; the model shifts them by one.
- masked LM (encoder-only, BERT): 15 % of positions are selected; of those 80 % become the mask
  token, 10 % a random token, 10 % stay; the loss covers only selected positions (label -100
  elsewhere).
- span corruption (encoder-decoder, T5): about 15 % of tokens, in spans of mean length 3, are
  each replaced in the input by one sentinel; the target lists every sentinel followed by the
  span it hides, then end-of-text. Lengths depend only on the window length, so batches stack.

Special ids sit at the top of the model's vocabulary (the data never uses them): the mask token
is `vocab_size - 1`; sentinels count down from `vocab_size - 1`, as T5's extra ids do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a batch is built: validation only needs the ids
    import torch

IGNORE = -100
MAX_SENTINELS = 100


def reserved_ids(objective: str, seq_len: int, density: float = 0.15,
                 mean_span: float = 3.0) -> int:
    """How many ids at the top of the vocabulary the objective needs for itself: the mask
    token, or one sentinel per span plus an end-of-text id just below them."""
    if objective == "mlm":
        return 1
    if objective == "span":
        return span_lengths(seq_len, density, mean_span)[1] + 1
    return 0


def causal(input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def mlm(input_ids: torch.Tensor, vocab_size: int, g: torch.Generator,
        probability: float = 0.15) -> dict[str, torch.Tensor]:
    import torch

    mask_id = vocab_size - 1
    selected = torch.rand(input_ids.shape, generator=g) < probability
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE))
    roll = torch.rand(input_ids.shape, generator=g)
    inputs = input_ids.clone()
    inputs[selected & (roll < 0.8)] = mask_id
    randomised = selected & (roll >= 0.8) & (roll < 0.9)
    inputs[randomised] = torch.randint(mask_id, input_ids.shape, generator=g)[randomised]
    return {"input_ids": inputs, "labels": labels}


def span_lengths(length: int, density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, spans) for a window of `length`, as T5 computes them."""
    noise = min(max(round(length * density), 1), length - 1)
    spans = min(max(round(noise / mean_span), 1), noise, MAX_SENTINELS)
    return noise, spans


def _split(total: int, parts: int, g: torch.Generator) -> list[int]:
    """A random split of `total` into `parts` positive lengths."""
    import torch

    cuts = sorted(torch.randperm(total - 1, generator=g)[: parts - 1].add(1).tolist())
    edges = [0, *cuts, total]
    return [b - a for a, b in zip(edges, edges[1:], strict=False)]


def noise_mask(length: int, density: float, mean_span: float, g: torch.Generator) -> list[bool]:
    """Alternating kept and noise runs, starting with kept text, T5-style."""
    noise, spans = span_lengths(length, density, mean_span)
    noise_runs = _split(noise, spans, g)
    keep_runs = _split(length - noise, spans, g)
    mask: list[bool] = []
    for keep, hide in zip(keep_runs, noise_runs, strict=True):
        mask += [False] * keep + [True] * hide
    return mask


def span_corruption(input_ids: torch.Tensor, vocab_size: int, g: torch.Generator,
                    density: float = 0.15, mean_span: float = 3.0) -> dict[str, torch.Tensor]:
    import torch

    spans = span_lengths(input_ids.shape[1], density, mean_span)[1]
    eos_id = vocab_size - 1 - spans
    inputs, targets = [], []
    for row in input_ids.tolist():
        mask = noise_mask(len(row), density, mean_span, g)  # same span count for every row
        source, target, sentinel, prev = [], [], vocab_size - 1, False
        for token, hidden in zip(row, mask, strict=True):
            if hidden and not prev:
                source.append(sentinel)
                target.append(sentinel)
                sentinel -= 1
            (target if hidden else source).append(token)
            prev = hidden
        inputs.append(source + [eos_id])
        targets.append(target + [eos_id])
    return {"input_ids": torch.tensor(inputs), "labels": torch.tensor(targets)}


def reconstruct(inputs: list[int], targets: list[int], vocab_size: int, n_spans: int) -> list[int]:
    """Undo span corruption (for tests and inspection): put each span back at its sentinel."""
    lowest_sentinel = vocab_size - n_spans
    spans: dict[int, list[int]] = {}
    current = None
    for token in targets[:-1]:
        if token >= lowest_sentinel:
            current = token
            spans[current] = []
        elif current is not None:
            spans[current].append(token)
    out: list[int] = []
    for token in inputs[:-1]:
        out += spans.get(token, [token])
    return out
