"""An independent reference for the 2-rank DDP losses: one plain PyTorch process, no orchestrator
import at all (torch and transformers only), re-implementing from their spec what our launcher,
sampler, strategy and loop do for `+recipe=ddp train.steps=20` with the schema's defaults:

- data: a Markov chain over 512 ids with 4 successors per id, 4096 sequences of 64 tokens drawn
  from a generator seeded with train.seed (data/datasets.py MarkovTokens, the algorithm copied);
- sampler: torch's DistributedSampler semantics (shuffle with seed + epoch, drop_last, rank r
  takes every world-th index from r), micro batches of 4 per rank, one micro batch per step;
- model: GPT-2 (2 layers, d_model 64, 4 heads, tied embeddings, 128 positions, no dropout, sdpa)
  from transformers, initialised right after torch.manual_seed(train.seed);
- step: each rank's loss is the mean next-token cross-entropy over its micro batch; DDP averages
  the gradients over ranks, so the step minimises the mean of the ranks' losses; clip the global
  grad norm to 1.0; AdamW(lr 3e-3, betas (0.9, 0.95), eps 1e-8, no weight decay; torch's
  fused kernel, which our optimizer steps with by default);
- LR: linear warmup over 2 steps, then cosine to 0.1 x lr at step 20 (set before each step);
- logged loss: the ranks' losses averaged.

The stored reference (assets/losses/gpt2_tiny_fp32_seed1234.json) was recorded from our own DDP
run, so a bug shared by the loop, the sampler or the loss averaging could not show against it;
this loop can. test_strategies.py compares the live DDP run with it as well.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

SEED, STEPS, WORLD, MICRO = 1234, 20, 2, 4
SAMPLES, SEQ, VOCAB, BRANCHING = 4096, 64, 512, 4
LR, WARMUP, MIN_RATIO, CLIP = 3e-3, 2, 0.1, 1.0
STORED = Path(__file__).resolve().parents[1] / "assets" / "losses" / "gpt2_tiny_fp32_seed1234.json"
# Measured (torch 2.13, CPU, one thread): the DDP run and the stored curve equal this loop bit
# for bit (max difference 0.0); with the default thread count here, or HF's own sliced loss, it
# is at most 1.2e-6 (float32 rounding of other kernel blockings). 1e-5 allows other CPUs'
# kernels. Spec changes tried move it by far more: ranks' losses summed instead of averaged
# 2.8e-3, LR one step late 2.2e-2, no shuffle 5.0e-2, both ranks on one shard 0.21. (Clipping
# is not observable here: the grad norm stays 0.70-0.94 until steps 19-20, 1.0007 and 1.0056.)
TOL = 1e-5


def markov_tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    successors = torch.stack([torch.randperm(VOCAB, generator=g)[:BRANCHING]
                              for _ in range(VOCAB)])
    tokens = torch.empty(SAMPLES, SEQ, dtype=torch.long)
    tokens[:, 0] = torch.randint(VOCAB, (SAMPLES,), generator=g)
    picks = torch.randint(BRANCHING, (SAMPLES, SEQ), generator=g)
    for t in range(1, SEQ):
        tokens[:, t] = successors[tokens[:, t - 1], picks[:, t]]
    return tokens


def rank_indices(rank: int, epoch: int = 0, samples: int = SAMPLES) -> list[int]:
    """DistributedSampler(shuffle=True, seed=SEED, drop_last=True) as documented."""
    g = torch.Generator().manual_seed(SEED + epoch)
    order = torch.randperm(samples, generator=g).tolist()
    order = order[: samples - samples % WORLD]
    return order[rank::WORLD]


def lr_at(step: int) -> float:
    if step <= WARMUP:
        return LR * step / WARMUP
    progress = (step - WARMUP) / (STEPS - WARMUP)
    return LR * MIN_RATIO + LR * (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def causal_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from tokens ..t, over the micro batch's
    tokens (written out here, not the model's own `labels=` loss). The target of the last
    position is -100 (ignored) rather than sliced off: the same sum in the same order."""
    logits = model(input_ids=ids).logits.float()
    targets = F.pad(ids[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)


@functools.cache
def plain_loop_losses() -> tuple[float, ...]:
    """The 20 logged losses, computed on one thread as each torchrun rank does
    (OMP_NUM_THREADS=1): then float32 kernels round alike and the curves agree bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _plain_loop()
    finally:
        torch.set_num_threads(threads)


def _plain_loop() -> tuple[float, ...]:
    return plain_loop(markov_tokens())[0]


def plain_loop(tokens: torch.Tensor, held_out: torch.Tensor | None = None,
               eval_every: int = 0) -> tuple[tuple[float, ...], dict[int, float]]:
    """The 20 logged losses of training on the sequences `tokens` as above; and every
    `eval_every` steps the mean next-token loss per token over all of `held_out`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    shards = [rank_indices(r, samples=len(tokens)) for r in range(WORLD)]
    config = GPT2Config(vocab_size=VOCAB, n_layer=2, n_embd=64, n_head=4, n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.0, fused=True)
    out, val = [], {}
    for step in range(1, STEPS + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        rank_losses = []
        for shard in shards:  # each rank's own micro batch, its loss averaged over ranks
            ids = tokens[shard[(step - 1) * MICRO: step * MICRO]]
            loss = causal_loss(model, ids)
            (loss / WORLD).backward()
            rank_losses.append(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        # the ranks' float32 losses are summed in float32 (one all-reduce), then divided
        out.append(torch.stack(rank_losses).sum().item() / WORLD)
        if eval_every and step % eval_every == 0:
            with torch.no_grad():
                logits = model(input_ids=held_out).logits.float()
                val[step] = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB),
                                            held_out[:, 1:].reshape(-1)).item()
    return tuple(out), val


def max_diff_from_plain_loop(got: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(got, plain_loop_losses(), strict=True))


def test_plain_loop_learns() -> None:
    got = plain_loop_losses()
    assert len(got) == STEPS and got[0] == pytest.approx(math.log(VOCAB), abs=0.1)
    assert sum(got[-5:]) / 5 < sum(got[:5]) / 5 - 0.1


def test_stored_reference_matches_the_plain_loop() -> None:
    """The json that every strategy is compared with is the plain loop's curve, not only our
    own earlier output."""
    stored = json.loads(STORED.read_text())["losses"]
    assert max_diff_from_plain_loop(stored) <= TOL
