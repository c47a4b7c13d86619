"""Context parallelism (CUDA): each sequence split over C ranks, attention computed as ring
attention by torch's `context_parallel`, FSDP2 (ZeRO-2/3) sharding over every rank.

Per micro batch, the token ids, the targets (token t+1 at position t, shifted *before* the
split so that no shard loses its last target) and the positions are handed to
`context_parallel`, which keeps each rank's head and tail chunk of every sequence (its load
balancer) and makes `scaled_dot_product_attention` ring attention over the C ranks, on the
fused kernels only (flash, memory-efficient, cuDNN; CPU has none: refused before launch).

transformers' Llama is given the positions and an all-ones attention mask of the local length:
with positions that jump (a head and a tail chunk) and no mask it would take the shard for
packed sequences and build a block mask; with an all-ones mask it passes none and SDPA runs
causal, which ring attention applies across the chunks.

The loss: each rank sums its tokens' cross-entropy; FSDP2 averages gradients over all D x C
ranks while a sequence's loss is the sum over its C shards divided by its scored tokens, so
each rank back-propagates C x its sum / the sequence's scored tokens (counted before the
split). Averaged over the world, that is the loss the loop reports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from orchestrator.config.schema import JobConfig
from orchestrator.run.mesh import context_mesh
from orchestrator.run.strategies import fsdp
from orchestrator.run.strategies.base import Engine

IGNORE = -100  # transformers' ignored label


def sequence_buffers(batch: dict[str, torch.Tensor],
                     device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids, targets, positions) of a causal-LM micro batch as new tensors on `device`,
    which `context_parallel` may shrink in place to this rank's chunks."""
    ids = batch["input_ids"].to(device, copy=True)
    targets = F.pad(batch["labels"].to(device), (0, 1), value=IGNORE)[:, 1:].contiguous()
    positions = torch.arange(ids.shape[1], device=ids.device).repeat(ids.shape[0], 1)
    return ids, targets, positions


@contextlib.contextmanager
def ring_attention(mesh: DeviceMesh, buffers: list[torch.Tensor]) -> Iterator[None]:
    """Inside: `buffers` hold this rank's chunks of their sequences (dimension 1), and SDPA is
    ring attention over `mesh` on the fused kernels. The buffers stay split afterwards."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(fused), context_parallel(mesh, buffers=buffers,
                                              buffer_seq_dims=[1] * len(buffers),
                                              no_restore_buffers=set(buffers)):
        yield


def shard_loss(logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor,
               c: int) -> torch.Tensor:
    """This rank's share of a micro batch's mean token loss, scaled for FSDP2's average over
    the C ranks of each sequence (see the module docstring)."""
    summed = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                             ignore_index=IGNORE, reduction="sum")
    return summed * c / scored.clamp(min=1)


class ContextParallelEngine(fsdp.FSDPEngine):
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, job: JobConfig,
                 device: str, scaler: Any, cp_mesh: DeviceMesh) -> None:
        super().__init__(model, optimizer, job, device, scaler=scaler)
        self.cp_mesh = cp_mesh

    def micro_step(self, batch: dict[str, torch.Tensor], n: int, last: bool) -> torch.Tensor:
        ids, targets, positions = sequence_buffers(batch, self.device)
        scored = (targets != IGNORE).sum()  # the whole sequences', before the split
        with self.no_sync(last), ring_attention(self.cp_mesh, [ids, targets, positions]):
            logits = self.model(input_ids=ids, position_ids=positions,
                                attention_mask=torch.ones_like(ids)).logits
            loss = shard_loss(logits, targets, scored, self.cp_mesh.size()) / n
            self.backward(loss, last)
        return loss.detach().float()


def setup(model: nn.Module, job: JobConfig, device: str) -> Engine:
    import torch.distributed as dist

    model, optimizer, scaler = fsdp.build(model, job, device)
    mesh = context_mesh(device, dist.get_world_size(), job.parallelism.context_parallel)
    return ContextParallelEngine(model, optimizer, job, device, scaler, mesh)
