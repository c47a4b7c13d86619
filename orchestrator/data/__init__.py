"""Data: sources, tokenizers, objectives, preparation into memory-mapped caches, and the batch
stream. This file only re-exports: the torch-free settings (settings.py) and preparation
(ready.py), and the torch side (stream.py), which is imported when one of its names is first
asked for.
"""

from __future__ import annotations

from typing import Any

from orchestrator.data.ready import prepare_data, prepare_tokenizer
from orchestrator.data.settings import (
    FAMILY_OBJECTIVE,
    data_vocab,
    eval_job,
    get_tokenizer,
    ids_needed,
    objective_of,
    tokenizer_file,
    uses_bpe,
)

__all__ = ["FAMILY_OBJECTIVE", "data_vocab", "eval_job", "get_tokenizer", "ids_needed",
           "objective_of", "prepare_data", "prepare_tokenizer", "tokenizer_file", "uses_bpe"]

STREAM = ("build_dataset", "train_and_held_out", "split", "stack", "with_objective",
          "make_collate", "batch_generator", "batches")


def __getattr__(name: str) -> Any:
    """The torch side (data/stream.py), imported when one of its names is first asked for."""
    if name in STREAM:
        import orchestrator.data.stream as stream

        return getattr(stream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
