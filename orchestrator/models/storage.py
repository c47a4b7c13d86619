"""Bytes a model's tensors hold, as allocated: distinct storages (views count once), a
DTensor's local shard, and the inner tensors of wrapper subclasses such as torchao's int8
tensors. What strategies report as measured model-state bytes and int8 quantization reports as
its weights' size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def wrapper_subclass(t: torch.Tensor) -> bool:
    """Whether `t` is a tensor subclass that keeps its data in inner tensors it names with
    `__tensor_flatten__` (the protocol torch.compile and torchao use)."""
    return type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__")


def _plain(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors holding `t`'s data: itself, a DTensor's local shard, or the inner
    tensors of a wrapper subclass such as torchao's int8 tensors (int8 data, scale, zero
    point), whose own storage is a placeholder without a data pointer."""
    t = _local(t)
    if not wrapper_subclass(t):
        yield t
        return
    names, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
    for inner in (getattr(t, n) for n in names):
        if inner is not None:
            yield from _plain(inner)


def storage_bytes(categories: dict[str, Iterable[torch.Tensor]]) -> dict[str, int]:
    """Bytes of the distinct storages behind each category's tensors (views count once, a
    freed FSDP buffer counts zero), so buckets and flat shards are measured as allocated."""
    seen: set[int] = set()
    out = {}
    for name, tensors in categories.items():
        total = 0
        for t in tensors:
            if t.device.type == "meta":  # shape-only bookkeeping tensors hold no memory
                continue
            for plain in _plain(t):
                storage = plain.untyped_storage()
                if storage.nbytes() and storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        out[name] = total
    return out
