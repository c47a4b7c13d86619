"""The datasets a job trains on and the rank-aware, resumable batch stream that feeds the
training loop (torch; `orchestrator.data` re-exports these names lazily, so validating and
planning a job never import torch)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from orchestrator.common.contract import DEVICE_ENV
from orchestrator.config.schema import JobConfig
from orchestrator.data import objectives
from orchestrator.data.datasets import MarkovTokens
from orchestrator.data.sampler import RankSampler
from orchestrator.data.settings import data_vocab, eval_job, objective_of


def build_dataset(job: JobConfig) -> Dataset:
    d = job.data
    if d.name == "synthetic":
        return MarkovTokens(d.num_samples, d.seq_len, data_vocab(job), d.branching,
                            seed=job.train.seed)
    if d.name in ("jsonl_sft", "jsonl_pref"):
        from orchestrator.data.pairs import PreparedRows

        return PreparedRows(job)  # tokenized before launch
    from orchestrator.data.memmap import MemmapTokens
    from orchestrator.data.mixture import Mixture
    from orchestrator.data.prepare import prepared

    parts = [MemmapTokens(p, d.seq_len) for p in prepared(job)]  # tokenized before launch
    return parts[0] if not d.sources else Mixture(parts, [s.weight for s in d.sources])


def train_and_held_out(job: JobConfig) -> tuple[Dataset, Dataset]:
    """(training samples, evaluation samples): the dataset less its held-out share, and that
    share, or the prepared `eval.path` when one is set."""
    train, held_out = split(build_dataset(job), job.eval.holdout)
    return train, held_out if job.eval.path is None else build_dataset(eval_job(job))


def split(dataset: Dataset, holdout: float) -> tuple[Dataset, Dataset]:
    """(train, held-out): the last `holdout` share of the samples is never trained on."""
    n = len(dataset)
    cut = n - max(1, int(n * holdout)) if holdout > 0 else n
    return Subset(dataset, range(cut)), Subset(dataset, range(cut, n))


def stack(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One micro batch from its samples."""
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def with_objective(job: JobConfig, batch: dict[str, torch.Tensor],
                   g: torch.Generator) -> dict[str, torch.Tensor]:
    """The objective's inputs and labels for a stacked batch of token ids (MLM masks and T5
    spans drawn from `g`); a batch the dataset labelled itself (SFT masks, DPO pairs) as is."""
    if "input_ids" not in batch or "labels" in batch:
        return batch
    objective, o, ids = objective_of(job), job.objective, batch["input_ids"]
    if objective == "mlm":
        return objectives.mlm(ids, job.model.vocab_size, g, o.mlm_probability)
    if objective == "span":
        return objectives.span_corruption(ids, job.model.vocab_size, g, o.noise_density,
                                          o.mean_span_length)
    return objectives.causal(ids)


def make_collate(job: JobConfig, rank: int) -> Callable[[list[dict[str, torch.Tensor]]],
                                                        dict[str, torch.Tensor]]:
    """Stack a micro batch and apply the objective, its randomness seeded per rank (one pass
    over held-out data; training uses `batches`)."""
    g = torch.Generator().manual_seed(job.train.seed * 1000 + rank)
    return lambda rows: with_objective(job, stack(rows), g)


def batch_generator(seed: int, rank: int, index: int) -> torch.Generator:
    """The objective's randomness for micro batch `index` of rank `rank`'s stream: its own, so
    a resumed stream draws the same masks however many epochs it skipped."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_000_000_007 + index)
                                         % 2**63)


def batches(dataset: Dataset, job: JobConfig, rank: int, world_size: int,
            start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro batches for this rank: each epoch reshuffles with seed + epoch, ranks see
    disjoint samples (`DistributedSampler`'s order, data/sampler.py), and the stream is a pure
    function of (seed, rank, micro-batch index); a resumed one reads nothing it skips."""
    micro = job.train.micro_batch_size
    sampler = RankSampler(len(dataset), world_size, rank, job.train.seed, job.data.shuffle)
    per_epoch = sampler.per_rank // micro
    if per_epoch == 0:
        raise ValueError(
            f"dataset has {len(dataset)} samples: too few for micro_batch_size "
            f"{micro} on {world_size} ranks")
    workers = job.data.num_workers
    pin = os.environ.get(DEVICE_ENV) == "cuda"  # for the engine's non_blocking copies
    loader = DataLoader(dataset, batch_size=micro, sampler=sampler, drop_last=True,
                        collate_fn=stack, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=pin)
    epoch, skip = divmod(start_step, per_epoch)
    index = start_step  # of the next micro batch in this rank's stream
    while True:
        sampler.set_epoch(epoch, start=skip * micro)
        for batch in loader:
            out = with_objective(job, batch, batch_generator(job.train.seed, rank, index))
            # the objective's labels and masks are made after the loader pinned the ids: pin
            # them too, or their copies to the GPU would wait for the host
            yield {k: v if v.is_pinned() else v.pin_memory() for k, v in out.items()} \
                if pin else out
            index += 1
        epoch, skip = epoch + 1, 0
