"""Several prepared sources as one dataset, each drawn by its weight (`data.sources`).

The mixture has as many windows as its sources together. Source s gets `round(n * w_s)` of them
(largest remainders, so they add up to n) and they are interleaved by stride scheduling: the
k-th draw of source s sits at key (k + ½) / count_s, and the windows are the draws sorted by
key. Every prefix of the mixture then holds each source's share to within one window, with no
randomness at all: the draw is the same at any world size, and the sampler's seeded shuffle
on top of it is what makes batches random. A source drawn more often than it has windows
repeats them; one drawn less often contributes evenly spaced windows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


def shares(n: int, weights: Sequence[float]) -> list[int]:
    """`n` split in proportion to `weights` (largest remainders: they add up to `n`)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = n * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - int(counts.sum())]:
        counts[i] += 1
    return counts.tolist()


class Mixture(Dataset):
    """Windows drawn from `parts` in proportion to `weights` (see the module docstring)."""

    def __init__(self, parts: Sequence[Dataset], weights: Sequence[float]) -> None:
        if len(parts) != len(weights) or any(w <= 0 for w in weights):
            raise ValueError(f"one positive weight per source, got {list(weights)}")
        self.parts, self.sizes = list(parts), [len(p) for p in parts]
        self.counts = shares(sum(self.sizes), weights)
        keys = np.concatenate([(np.arange(c) + 0.5) / c for c in self.counts if c])
        self.order = np.argsort(keys, kind="stable")  # mixture index -> draw (by source)
        self.starts = np.cumsum([0, *self.counts])

    def __len__(self) -> int:
        return len(self.order)

    def locate(self, i: int) -> tuple[int, int]:
        """(source, window of that source) of mixture window `i`."""
        draw = int(self.order[i])
        s = int(np.searchsorted(self.starts, draw, side="right")) - 1
        k = draw - int(self.starts[s])
        return s, k * self.sizes[s] // self.counts[s]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s, window = self.locate(i)
        return self.parts[s][window]
