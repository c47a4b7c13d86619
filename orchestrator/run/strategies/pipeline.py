"""Pipeline parallelism with `torch.distributed.pipelining`: each rank holds one stage of a
transformers Llama (models/pipeline.py: which blocks, the embedding on the first, the final
norm and head on the last) and runs each step's batch as micro-batches under GPipe or 1F1B.

The stage is the model itself with the other stages' blocks replaced by empty modules and its
forward replaced by the stage's part of Llama's, so every parameter keeps its name: a
checkpoint written by the stages is the whole model's (DCP), and loads under another layout.
Weights: rank 0 built the whole model, the others theirs on the meta device; rank 0 sends each
stage its parameters (point to point) and every rank its buffers (rotary frequencies).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from orchestrator.config.derived import pipeline_microbatches
from orchestrator.config.schema import JobConfig
from orchestrator.models.pipeline import stage_blocks, stage_of
from orchestrator.run.strategies.base import (
    Engine,
    broadcast_from_rank0,
    build_optimizer,
    materialize,
)

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def causal_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of token t+1 given tokens ..t over one micro-batch (HF's own loss:
    the last position has no target, -100 is ignored)."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(),
                           labels[:, 1:].reshape(-1), ignore_index=-100)


def _stage_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Llama's forward for the blocks this stage holds (`self._stage_blocks`): token ids in on
    the first stage, hidden states between stages, logits out of the last."""
    from transformers.masking_utils import create_causal_mask

    inner = self.model
    h = inner.embed_tokens(x) if inner.embed_tokens is not None else x
    positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
    mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=None,
                              cache=None, position_ids=positions)
    rotary = inner.rotary_emb(h, position_ids=positions)
    for i in self._stage_blocks:
        h = inner.layers[i](h, attention_mask=mask, position_ids=positions,
                            position_embeddings=rotary)
    return self.lm_head(inner.norm(h)) if inner.norm is not None else h


def _prune(model: nn.Module, stage: int, stages: int) -> None:
    """Keep this stage's blocks (and root parts); the rest become empty modules."""
    inner = model.model
    blocks = stage_blocks(len(inner.layers), stages)[stage]
    for i in range(len(inner.layers)):
        if i not in blocks:
            inner.layers[i] = nn.Identity()
    if stage != 0:
        inner.embed_tokens = None
    if stage != stages - 1:
        inner.norm, model.lm_head = None, None
    model._stage_blocks = list(blocks)
    model.forward = types.MethodType(_stage_forward, model)


def _send_stages(model: nn.Module, full: dict[str, torch.Tensor], owner: dict[str, int],
                 device: torch.device) -> None:
    """Rank 0 sends each parameter to the rank of the stage that holds it (in `owner`'s order,
    which every rank knows), from the device (NCCL sends device tensors; rank 0 built the
    model on the host), then every buffer to every rank."""
    rank, mine = dist.get_rank(), dict(model.named_parameters())
    for name, stage in owner.items():
        if stage == 0:
            continue
        if rank == 0:
            dist.send(full[name].to(device).contiguous(), dst=stage)
        elif rank == stage:
            with torch.no_grad():
                dist.recv(mine[name].data, src=0)
    broadcast_from_rank0(model.buffers())


class PipelineEngine(Engine):
    """One stage: `train_step` runs the schedule over the step's whole batch."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, job: JobConfig,
                 device: str, schedule: Any, stage: int, stages: int) -> None:
        super().__init__(model, optimizer, job, device)
        self.schedule, self.stage, self.stages = schedule, stage, stages

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every stage's weights gathered on rank 0 (a collective)."""
        mine = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        parts: list[Any] = [None] * self.stages
        dist.all_gather_object(parts, mine)
        return {k: v for part in parts for k, v in part.items()}

    def clip(self, max_norm: float) -> None:
        """The global gradient norm over all stages, clipped as clip_grad_norm_ does."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        squares = torch.zeros((), device=self.device)
        for g in grads:
            squares += g.detach().float().norm() ** 2
        dist.all_reduce(squares)
        coef = torch.clamp(max_norm / (squares.sqrt() + 1e-6), max=1.0)
        for g in grads:
            g.detach().mul_(coef.to(g.dtype))

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        ids = torch.cat([b["input_ids"] for b in micro_batches]).to(self.device)
        labels = torch.cat([b["labels"] for b in micro_batches]).to(self.device)
        first, last = self.stage == 0, self.stage == self.stages - 1
        if self.probe:  # gradients are freed: the model state a forward holds
            self.probe("after_forward")
        losses: list[torch.Tensor] = []
        with self.autocast():
            args = (ids,) if first else ()
            self.schedule.step(*args, target=labels if last else None,
                               losses=losses if last else None)
        loss = (torch.stack(losses).mean().detach() if last
                else torch.zeros((), device=self.device))
        dist.broadcast(loss, src=self.stages - 1)
        if self.probe:
            self.probe("after_backward")
        if self.job.train.grad_clip > 0:
            self.clip(self.job.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def setup(model: nn.Module, job: JobConfig, device: str) -> Engine:
    stage, stages = dist.get_rank(), job.parallelism.pipeline_parallel
    full = model.state_dict() if stage == 0 else {}
    n_layer = len(model.model.layers)
    owner = {name: stage_of(name, n_layer, stages) for name, _ in model.named_parameters()}
    _prune(model, stage, stages)
    materialize(model, device)
    # this rank's own GPU (distributed.init made it the current device), never GPU 0's
    here = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else \
        torch.device(device)
    _send_stages(model, full, owner, here)
    del full
    pipe = PipelineStage(model, stage, stages, here)
    schedule = SCHEDULES[job.parallelism.pipeline_schedule](
        pipe, n_microbatches=pipeline_microbatches(job), loss_fn=causal_loss, scale_grads=True)
    optimizer = build_optimizer(model.parameters(), job)
    return PipelineEngine(model, optimizer, job, device, schedule, stage, stages)
