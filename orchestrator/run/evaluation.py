"""Held-out evaluation: loss per token, perplexity and token accuracy on the last `eval.holdout`
share of the dataset (`data.split`), which training with the same `eval.holdout` never sees.

One pass is shared by the evaluate recipe (recipes/evaluate.py) and by evaluation during
pre-training (`eval.every_steps`, recipes/pretrain.py through `loop.train`). During training it
leaves the run as it found it: the model's train/eval flags and the RNG states are restored, and
the training batch stream is never touched, so the training losses are bit-identical with and
without it."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from orchestrator.config.derived import data_parallel_rank, ranks_per_share
from orchestrator.config.schema import JobConfig
from orchestrator.data import make_collate, objective_of
from orchestrator.run.strategies.base import Engine

VAL_PREFIX = "val/"  # during training: the metrics' names in metrics.jsonl and W&B


def held_out_sums(engine: Engine, held_out: Dataset, job: JobConfig, rank: int,
                  world_size: int) -> torch.Tensor:
    """[summed token loss, scored tokens, correct predictions] over at most `eval.max_batches`
    micro batches of this rank's share of `held_out`, summed over all ranks (a collective:
    every rank runs the same number of batches, since the sampler pads the shares evenly).
    The shares are the data-parallel ranks': a tensor-parallel group (or a pipeline, or the
    ranks splitting a sequence) evaluates one share together, and each of its ranks holds the
    same sums, so the total is divided by their number."""
    holders = ranks_per_share(job)
    share, shares = data_parallel_rank(job, rank), world_size // holders
    sampler = DistributedSampler(held_out, shares, share, shuffle=False)
    loader = DataLoader(held_out, batch_size=job.train.micro_batch_size, sampler=sampler,
                        collate_fn=make_collate(job, share))
    shift = objective_of(job) == "causal"
    total = torch.zeros(3, device=engine.device)
    for batch in itertools.islice(loader, job.eval.max_batches):
        total += engine.eval_step(batch, shift=shift)
    dist.all_reduce(total)
    return total / holders


def summarize(total: torch.Tensor) -> dict[str, float]:
    """`held_out_sums`' totals as loss per token, perplexity, accuracy and token count."""
    loss_sum, tokens, correct = total.tolist()
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": perplexity(loss), "accuracy": correct / tokens,
            "tokens": int(tokens)}


def perplexity(loss: float) -> float:
    """exp(loss per token); inf where that overflows a float (an untrained or diverged model)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module of `model` in eval mode (no dropout) inside, and afterwards each back in the
    mode it was in, set directly (no `train()` override runs, e.g. DeepSpeed's)."""
    modes = [(m, m.training) for m in model.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def evaluate_during_training(engine: Engine, held_out: Dataset, job: JobConfig, rank: int,
                             world_size: int) -> dict[str, float]:
    """`val/loss`, `val/perplexity` and `val/accuracy` of the model as it is now
    (`eval.every_steps`): a collective, without gradients, in eval mode; the CPU and CUDA RNG
    states are restored afterwards (the DataLoader draws its base seed from the global
    generator)."""
    devices = [torch.cuda.current_device()] if engine.device == "cuda" else []
    with torch.random.fork_rng(devices=devices), eval_mode(engine.model), torch.no_grad():
        result = summarize(held_out_sums(engine, held_out, job, rank, world_size))
    return {f"{VAL_PREFIX}{k}": result[k] for k in ("loss", "perplexity", "accuracy")}
