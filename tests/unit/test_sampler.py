"""RankSampler gives exactly torch's DistributedSampler(drop_last=True) order, the reference
every loss test and the plain loop are built on, in 4 bytes per sample."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DistributedSampler

from orchestrator.data.sampler import RankSampler


@pytest.mark.parametrize(("n", "world", "shuffle"), [(10, 3, True), (4096, 2, True),
                                                     (4097, 4, True), (37, 2, False),
                                                     (3_000_017, 2, True)])
def test_rank_sampler_is_torchs_distributed_sampler(n: int, world: int, shuffle: bool) -> None:
    for rank, epoch in itertools.product(range(world), (0, 3)):
        want = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle,
                                  seed=11, drop_last=True)
        want.set_epoch(epoch)
        got = RankSampler(n, world, rank, seed=11, shuffle=shuffle)
        got.set_epoch(epoch)
        assert list(got) == list(want) and len(got) == len(want)
        got.set_epoch(epoch, start=5)  # a resumed epoch: the same order from the 6th sample
        assert list(got) == list(want)[5:] and len(got) == max(0, len(want) - 5)


def test_the_permutation_is_held_as_int32() -> None:
    """torch.randperm draws the same permutation in int32 as in int64 (what makes the 4 bytes
    per sample possible): checked here on a size where the two would differ if it did not."""
    g32, g64 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    n = 9_000_001
    assert torch.equal(torch.randperm(n, generator=g32, dtype=torch.int32).long(),
                       torch.randperm(n, generator=g64))
