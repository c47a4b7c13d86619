"""Training windows read straight from a prepared token file (data/prepare.py): the file is
memory-mapped, so a rank's host memory does not grow with the corpus and it reads only the
windows it is given."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from orchestrator.data.cache import MANIFEST, TOKENS


class MemmapTokens(Dataset):
    """Back-to-back windows of `seq_len` tokens over the prepared token stream (documents
    joined by end-of-text): the windows `PackedText` builds in memory from the same text."""

    def __init__(self, prepared: str | Path, seq_len: int) -> None:
        prepared = Path(prepared)
        manifest = json.loads((prepared / MANIFEST).read_text())
        self.tokens = np.memmap(prepared / TOKENS, dtype=manifest["dtype"], mode="r")
        self.seq_len = seq_len
        self.n = len(self.tokens) // seq_len
        if self.n == 0:
            raise ValueError(f"{prepared} has {len(self.tokens)} tokens, fewer than one "
                             f"sequence ({seq_len})")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        window = self.tokens[i * self.seq_len:(i + 1) * self.seq_len]
        return {"input_ids": torch.from_numpy(window.astype(np.int64))}
