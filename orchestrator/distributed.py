"""Per-rank process-group set-up and tear-down (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    device: str


def init(device: str) -> RankInfo:
    """Join the job's process group. Under torchrun the env:// variables are set; a single
    process without them gets a one-rank group, so every strategy runs unchanged."""
    backend = "nccl" if device == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        # One process, no launcher: DeepSpeed (and other libraries) read torchrun's variables
        # and assert on LOCAL_RANK, so set them as torchrun would for a one-rank job.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return RankInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def node_name() -> str:
    """This rank's node (Slurm's node name when under srun)."""
    import socket

    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def gather(value: Any) -> list[Any]:
    """Every rank's `value` (any picklable object), in rank order, on all ranks."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def shutdown() -> None:
    """Destroy the process group while the interpreter is fully alive."""
    import gc

    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
