"""Datasets and the rank-aware, resumable batch stream that feeds the training loop."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from orchestrator.data.corpus import build_corpus
from orchestrator.data.datasets import MarkovTokens, PackedText
from orchestrator.schema import JobConfig


def build_dataset(job: JobConfig) -> Dataset:
    d = job.data
    if d.name == "synthetic":
        return MarkovTokens(d.num_samples, d.seq_len, job.model.vocab_size, d.branching,
                            seed=job.train.seed)
    return PackedText(d.path or str(build_corpus()), d.seq_len)


def batches(dataset: Dataset, job: JobConfig, rank: int, world_size: int,
            start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro batches for this rank: each epoch reshuffles with seed + epoch, ranks see
    disjoint samples, and the stream is a pure function of (seed, rank, micro-batch index)."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                 shuffle=job.data.shuffle, seed=job.train.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=job.train.micro_batch_size, sampler=sampler,
                        drop_last=True)
    if len(loader) == 0:
        raise ValueError(
            f"dataset has {len(dataset)} samples: too few for micro_batch_size "
            f"{job.train.micro_batch_size} on {world_size} ranks")
    epoch, skip = divmod(start_step, len(loader))
    while True:
        sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i >= skip:
                yield batch
        epoch, skip = epoch + 1, 0
