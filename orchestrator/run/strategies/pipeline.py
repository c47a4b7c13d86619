"""Pipeline parallelism with `torch.distributed.pipelining`: each rank holds one stage of a
transformers Llama (models/pipeline.py: which blocks, the embedding on the first, the final
norm and head on the last), or V of them under the multi-stage schedules, and runs each step's
batch as micro-batches under GPipe, 1F1B, interleaved 1F1B or the zero-bubble schedules.

The mesh is pp x dp x tp (run/mesh.py): world / P ranks hold each stage. Its data-parallel
ranks each read their own share of the data and average the stage's gradients after the
schedule (zero_stage 0) or shard them with FSDP2 (zero_stage 2, parameters gathered once per
step: the schedule defers FSDP's reshard and gradient reduction to the stage's last backward,
`perform_reduce_grad`); its tensor-parallel ranks split it as run/mesh.py splits a model.

Each rank's stages are cut from the model in place (pipeline_stage.py), so every parameter
keeps its name: a checkpoint written by the stages is the whole model's (DCP), and loads under
another layout.
Weights: rank 0 built the whole model, the others theirs on the meta device; rank 0 sends each
rank its stage's parameters (point to point) and every rank its buffers (rotary frequencies);
FSDP2 then keeps each rank's shard of them.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)
from torch.distributed.tensor import DTensor

from orchestrator.config.derived import (
    data_parallel_size,
    pipeline_microbatches,
    pipeline_stages_per_rank,
)
from orchestrator.config.schema import JobConfig
from orchestrator.models.layout import embedding_name
from orchestrator.models.pipeline import rank_of_stage, stage_of, stages_of_rank
from orchestrator.models.tensor_parallel import FUSED_QKV, split_dim
from orchestrator.run import precision as prec
from orchestrator.run.mesh import (
    PP,
    TP,
    data_mesh,
    device_mesh,
    held_blocks,
    keep_grads_in_place,
    tensor_parallelize,
    tied_head,
)
from orchestrator.run.strategies.base import (
    Engine,
    broadcast_from_rank0,
    build_optimizer,
    materialize,
    token_sums,
    whole,
)
from orchestrator.run.strategies.fsdp import fsdp_held_tensors
from orchestrator.run.strategies.fused_qkv import FusedQKV, fused_names, regroup
from orchestrator.run.strategies.pipeline_stage import StageChunk, prune
from orchestrator.run.strategies.pipeline_tie import TiedCopies, untie

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
MULTI_STAGE = {"interleaved_1f1b": ScheduleInterleaved1F1B,
               "interleaved_zb": ScheduleInterleavedZeroBubble, "zbv": ScheduleZBVZeroBubble}


def causal_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of token t+1 given tokens ..t over one micro-batch (HF's own loss:
    the last position has no target, -100 is ignored)."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(),
                           labels[:, 1:].reshape(-1), ignore_index=-100)


def _send_stages(model: nn.Module, full: dict[str, torch.Tensor], owner: dict[str, int],
                 pipeline_rank: list[int], device: torch.device) -> None:
    """Rank 0 sends each parameter to every rank whose pipeline rank holds it (`owner`, in an
    order every rank knows), from the device (NCCL sends device tensors; rank 0 built the model
    on the host), then every buffer to every rank."""
    rank, mine = dist.get_rank(), dict(model.named_parameters(remove_duplicate=False))
    for name, holder in owner.items():
        for dst in range(1, len(pipeline_rank)):
            if pipeline_rank[dst] != holder:
                continue
            if rank == 0:
                dist.send(full[name].to(device).contiguous(), dst=dst)
            elif rank == dst:
                with torch.no_grad():
                    dist.recv(mine[name].data, src=0)
    broadcast_from_rank0(model.buffers())


class PipelineEngine(Engine):
    """This rank's stages: `train_step` runs the schedule over the step's whole batch."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, job: JobConfig,
                 device: str, schedule: Any, mesh: DeviceMesh,
                 stage_modules: dict[int, nn.Module], tie: TiedCopies | None = None) -> None:
        super().__init__(model, optimizer, job, device)
        self.schedule, self.mesh, self.stage_modules = schedule, mesh, stage_modules
        self.tie = tie  # a tied head's two copies on the first and the last stage
        self.adapters = [tie] if tie else []
        ranks, per_rank = mesh[PP].size(), pipeline_stages_per_rank(job)
        self.n_stages, kind = ranks * per_rank, job.parallelism.pipeline_schedule
        self.rank_of = lambda stage: rank_of_stage(stage, ranks, per_rank, kind)
        self.first, self.last = 0 in stage_modules, self.n_stages - 1 in stage_modules
        self.last_rank = self.rank_of(self.n_stages - 1)  # computes the loss
        self.sharded = job.parallelism.zero_stage == 2

    def autocast(self) -> Any:
        # FSDP2's MixedPrecisionPolicy casts the parameters instead
        return contextlib.nullcontext() if self.sharded else super().autocast()

    def held_tensors(self) -> dict[str, Any]:
        if self.sharded:
            return fsdp_held_tensors(self.model, self.optimizer_state())
        return super().held_tensors()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every stage's weights gathered on rank 0 (a collective: FSDP2's shards are gathered
        within each stage first)."""
        mine = {k: whole(v).detach().cpu() for k, v in self.hf_model().state_dict().items()}
        parts: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine if _data_rank(self.mesh) == 0 else {}, parts, dst=0)
        state = {k: v for part in parts or [] for k, v in part.items()}
        for adapter in self.adapters if state else ():
            adapter.to_whole(state)
        return state

    def average_grads(self) -> None:
        """zero_stage 0 with data-parallel ranks: the stage's gradients averaged over them once
        the schedule has accumulated every micro-batch's, in flat buckets of at most
        `parallelism.bucket_cap_mb`. (torch's DDP inside a pipeline schedule fails its bucket
        rebuild on the second step, and with `static_graph` its losses differed from the
        2-rank DDP run's from the second step on: test_pipeline_data_parallel.py's layouts.)"""
        n = data_parallel_size(self.job)
        if n == 1 or self.sharded:
            return
        group = data_mesh(self.mesh).get_group()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        for bucket in _buckets(grads, int(self.job.parallelism.bucket_cap_mb * 2**20)):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, group=group)
            flat /= n
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
                g.copy_(part.view_as(g))

    def clip(self, max_norm: float) -> None:
        """The global gradient norm over all stages, clipped as clip_grad_norm_ does: each
        rank's squares (its slice's, under FSDP2 and TP) summed over the world, each divided by
        the number of ranks holding the same elements (`_copies`)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        squares = torch.zeros((), device=self.device)
        replicated = data_parallel_size(self.job)  # a plain gradient: on every dp rank
        for p, g in zip(params, grads, strict=True):
            local = g.to_local() if isinstance(g, DTensor) else g
            copies = _copies(g, replicated) * (self.tie.copies(p) if self.tie else 1)
            squares += local.detach().float().norm() ** 2 / copies
        dist.all_reduce(squares)
        coef = torch.clamp(max_norm / (squares.sqrt() + 1e-6), max=1.0)
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).detach().mul_(coef.to(g.dtype))

    @torch.no_grad()
    def eval_step(self, batch: dict[str, torch.Tensor], shift: bool) -> torch.Tensor:
        """One forward of the batch through every stage in order (each rank receives the hidden
        states of the stage before each of its own, point to point, in fp32), the sums on the
        last stage's rank, broadcast to the pipeline's ranks."""
        group, h = self.mesh[PP].get_group(), batch["input_ids"].to(self.device)
        t = self.job.parallelism.tensor_parallel  # TP ranks pass their slices of the sequence
        shape = (h.shape[0], h.shape[1] // t, self.hf_model().config.hidden_size)
        me = self.mesh[PP].get_local_rank()
        for k in sorted(self.stage_modules):
            if k > 0 and self.rank_of(k - 1) != me:  # zbv: stages P-1 and P share a rank
                h = torch.empty(shape, device=self.device)
                dist.recv(h, group=group, group_src=self.rank_of(k - 1))
            with self.autocast():
                h = self.stage_modules[k](h)
            if k < self.n_stages - 1 and self.rank_of(k + 1) != me:
                dist.send(h.float().contiguous(), group=group, group_dst=self.rank_of(k + 1))
        sums = (token_sums(whole(h), batch["labels"].to(self.device), shift) if self.last
                else torch.zeros(3, device=self.device))
        dist.broadcast(sums, group=group, group_src=self.last_rank)
        return sums

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        ids = torch.cat([b["input_ids"] for b in micro_batches]).to(self.device)
        labels = torch.cat([b["labels"] for b in micro_batches]).to(self.device)
        first, last = self.first, self.last
        if self.probe:  # gradients are freed: the model state a forward holds
            self.probe("after_forward")
        losses: list[torch.Tensor] = []
        with self.autocast(), self.loss_context():
            args = (ids,) if first else ()
            self.schedule.step(*args, target=labels if last else None,
                               losses=losses if last else None)
        loss = (whole(torch.stack(losses).mean().detach()) if last
                else torch.zeros((), device=self.device))
        dist.broadcast(loss, group=self.mesh[PP].get_group(), group_src=self.last_rank)
        self.average_grads()
        if self.tie:
            self.tie.sync()
        self.finish_step()
        return loss


def _copies(g: torch.Tensor, plain: int) -> int:
    """How many ranks of a pipeline stage hold each element of gradient `g`: a DTensor's
    replicated mesh dimensions (HSDP's replicas, the tensor-parallel ranks of a norm), or
    `plain` for a plain tensor."""
    if not isinstance(g, DTensor):
        return plain
    return math.prod(g.device_mesh.size(i) for i, p in enumerate(g.placements)
                     if p.is_replicate())


def _buckets(grads: list[torch.Tensor], cap: int) -> list[list[torch.Tensor]]:
    """Consecutive gradients of one dtype, at most `cap` bytes each (a larger one alone)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if not out or size + nbytes > cap or out[-1][0].dtype != g.dtype:
            out.append([])
            size = 0
        out[-1].append(g)
        size += nbytes
    return out


def _data_rank(mesh: DeviceMesh) -> int:
    """This rank's place among its stage's data-parallel ranks (0: the stage's first)."""
    return dist.get_rank() % (dist.get_world_size() // mesh[PP].size())


def _data_parallel(model: nn.Module, job: JobConfig, mesh: DeviceMesh) -> nn.Module:
    """The stage sharded by FSDP2 ZeRO-2 over its data-parallel ranks in `mesh` (parameters
    gathered from the first forward to the last backward), or as it is (zero_stage 0)."""
    p = job.parallelism
    if p.zero_stage == 0:  # replicated: PipelineEngine.average_grads after each schedule
        return model
    prec_cfg = job.precision
    policy = prec.fsdp_policy(prec_cfg.name, prec_cfg.param_dtype, prec_cfg.reduce_dtype)
    kwargs = {"mesh": data_mesh(mesh), "mp_policy": policy, "reshard_after_forward": False}
    for block in held_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _schedule(modules: dict[int, nn.Module], job: JobConfig, mesh: DeviceMesh,
              here: torch.device) -> Any:
    """The schedule over this rank's stages (`modules`, by stage index)."""
    stages = mesh[PP].size() * pipeline_stages_per_rank(job)
    group, micro = mesh[PP].get_group(), pipeline_microbatches(job)
    kind = job.parallelism.pipeline_schedule
    pipes = [PipelineStage(m, k, stages, here, group=group) for k, m in modules.items()]
    if len(pipes) == 1:
        return SCHEDULES[kind](pipes[0], n_microbatches=micro, loss_fn=causal_loss,
                               scale_grads=True)
    return MULTI_STAGE[kind](pipes, n_microbatches=micro, loss_fn=causal_loss, scale_grads=True)


def setup(model: nn.Module, job: JobConfig, device: str) -> Engine:
    world, ranks = dist.get_world_size(), job.parallelism.pipeline_parallel
    per_rank = pipeline_stages_per_rank(job)
    t = job.parallelism.tensor_parallel
    mesh = device_mesh(device, world, job.parallelism.replicate_degree, t, pp=ranks)
    kind = job.parallelism.pipeline_schedule
    held = stages_of_rank(mesh[PP].get_local_rank(), ranks, per_rank, kind)
    full = model.state_dict() if dist.get_rank() == 0 else {}
    n_layer, tied = model.config.num_hidden_layers, tied_head(model)
    # every name of each parameter: a tied head is sent to the last stage as well
    owner = {name: rank_of_stage(stage_of(name, n_layer, ranks * per_rank), ranks, per_rank,
                                 kind) for name, _ in model.named_parameters(
                                     remove_duplicate=False)}
    prune(model, held, ranks * per_rank, seq_split=t)
    materialize(model, device)
    # this rank's own GPU (distributed.init made it the current device), never GPU 0's
    here = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else \
        torch.device(device)
    _send_stages(model, full, owner, [r // (world // ranks) for r in range(world)], here)
    del full
    if tied:
        untie(model, embedding_name(model.config.model_type))
    if t > 1:  # each rank keeps its slices of its full stage weights
        _regroup_fused(model, job.model.family, t)
        tensor_parallelize(model, mesh[TP], job.model.family)
    model = _data_parallel(model, job, mesh)
    if t > 1 and job.parallelism.zero_stage == 0:
        keep_grads_in_place(model)
    # the model itself (replicated or FSDP2-wrapped) is its one stage, or a chunk of it each
    modules = {held[0]: model} if len(held) == 1 else {
        k: StageChunk(model, k, ranks * per_rank) for k in held}
    schedule = _schedule(modules, job, mesh, here)
    optimizer = build_optimizer(model.parameters(), job)
    ends = [rank_of_stage(k, ranks, per_rank, kind) for k in (0, ranks * per_rank - 1)]
    tie = TiedCopies(embedding_name(model.config.model_type), mesh, *ends, model) if tied else None
    engine = PipelineEngine(model, optimizer, job, device, schedule, mesh, modules, tie)
    if t > 1 and job.model.family in FUSED_QKV:
        engine.adapters.append(FusedQKV(model, job.model.family, t))
    return engine


def _regroup_fused(model: nn.Module, family: str, tp: int) -> None:
    """GPT-2's attention columns regrouped in place, each TP rank's its own heads' q, k, v."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in fused_names(params, family):
            params[name].copy_(regroup(params[name], split_dim(family, name), tp))
