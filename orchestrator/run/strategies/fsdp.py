"""ZeRO stages 2 and 3 on FSDP2 (`fully_shard`), one unit per transformer block plus the root.

Stage 2: `reshard_after_forward=False` — parameters are sharded at rest, gathered for forward
and kept until backward ends; gradients and optimizer state are sharded.
Stage 3: `reshard_after_forward=True` — each block's parameters are freed after its forward and
gathered again in backward. The root group (embeddings, final norm, head) is not resharded
after forward: backward needs it first, so freeing it would only add an all-gather.

With `parallelism.tensor_parallel` T > 1 the model is first split over the mesh's `tp`
dimension (run/mesh.py), then FSDP2 shards those slices over its data-parallel dimensions
(stages 2/3); with stage 0/1 and no data-parallel ranks beside TP it runs unwrapped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard

from orchestrator.config.schema import JobConfig
from orchestrator.models.build import transformer_blocks
from orchestrator.models.layout import embedding_name
from orchestrator.models.tensor_parallel import FUSED_QKV
from orchestrator.run import precision as prec
from orchestrator.run.mesh import (
    TP,
    data_mesh,
    device_mesh,
    keep_grads_in_place,
    retie,
    tensor_parallelize,
    tied_head,
)
from orchestrator.run.strategies.base import (
    Engine,
    broadcast_from_rank0,
    build_optimizer,
    materialize,
    on_meta,
)
from orchestrator.run.strategies.fused_qkv import FusedQKV, regroup_state
from orchestrator.run.strategies.pipeline_tie import SharedHead


class MeshEngine(Engine):
    """A model whose parameters are DTensors on the device mesh (tensor parallel only)."""

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        for adapter in self.adapters if state else ():  # rank 0's state only
            adapter.to_whole(state)
        return state


class FSDPEngine(MeshEngine):
    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # the MixedPrecisionPolicy casts parameters instead

    def held_tensors(self) -> dict[str, Iterable[torch.Tensor]]:
        return fsdp_held_tensors(self.model, self.optimizer_state())


def fsdp_held_tensors(model: nn.Module,
                      optimizer_state: Iterable[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """What FSDP2 holds for `model` now: each parameter's padded local shard, its gathered copy
    and that copy's gradient while alive, the sharded gradient, and `optimizer_state`."""
    params, grads = [], []
    for module in model.modules():
        group = module._get_fsdp_state()._fsdp_param_group if isinstance(
            module, FSDPModule) else None
        for fp in group.fsdp_params if group is not None else ():
            params.append(fp._sharded_param_data)  # the padded local shard
            unsharded = getattr(fp, "_unsharded_param", None)  # gathered copy, if alive
            if unsharded is not None:
                params.append(unsharded)
                if unsharded.grad is not None:
                    grads.append(unsharded.grad)
            if fp.sharded_param.grad is not None:
                grads.append(fp.sharded_param.grad)
    return {"params_bytes": params, "grads_bytes": grads,
            "optimizer_bytes": list(optimizer_state)}


def load_from_rank0(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Every rank's shards from rank 0's full state dict (`full` is empty elsewhere), one
    tensor at a time, then the buffers (non-persistent ones, e.g. rotary frequencies, are not in
    a state dict)."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    broadcast_from_rank0(model.buffers())


def setup(model: nn.Module, job: JobConfig, device: str) -> Engine:
    model, optimizer, scaler = build(model, job, device)
    engine = FSDPEngine if job.parallelism.zero_stage in (2, 3) else MeshEngine
    out = engine(model, optimizer, job, device, scaler=scaler)
    t, family = job.parallelism.tensor_parallel, job.model.family
    if t > 1 and tied_head(model):  # re-tied by tensor_parallelize (FSDP2 alone keeps its own)
        out.adapters.append(SharedHead(embedding_name(family)))
    if t > 1 and family in FUSED_QKV:
        out.adapters.append(FusedQKV(model, family, t))
    return out


def build(model: nn.Module, job: JobConfig,
          device: str) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """The model on the mesh (split by TP, sharded by FSDP2, weights from rank 0), its
    optimizer and fp16's grad scaler (None otherwise)."""
    import torch.distributed as dist

    world, p, prec_cfg = dist.get_world_size(), job.parallelism, job.precision
    # Rank 0 built the real model; the others built it on the meta device and allocate only
    # their shards after sharding. Rank 0's full weights are kept by reference until sent.
    full = model.state_dict() if world > 1 and not on_meta(model) else {}
    if p.tensor_parallel > 1:  # GPT-2: each rank's attention columns its own heads' q, k, v
        regroup_state(full, job.model.family, p.tensor_parallel)
    mesh = device_mesh(device, world, p.replicate_degree, p.tensor_parallel)
    tied = p.tensor_parallel > 1 and tied_head(model)
    if p.tensor_parallel > 1:
        tensor_parallelize(model, mesh[TP], job.model.family)
    sharded = p.zero_stage in (2, 3)
    if sharded:
        policy = prec.fsdp_policy(prec_cfg.name, prec_cfg.param_dtype, prec_cfg.reduce_dtype)
        kwargs = {"mesh": data_mesh(mesh), "mp_policy": policy}
        for block in transformer_blocks(model):
            fully_shard(block, reshard_after_forward=p.zero_stage == 3, **kwargs)
        fully_shard(model, reshard_after_forward=False, **kwargs)
    if world > 1:
        materialize(model, device)
        load_from_rank0(model, full)  # may swap in new parameter objects: hooks come after
        del full
    if tied and not sharded:  # FSDP2 keeps the tie it was given (tensor_parallelize's)
        retie(model)
    if p.tensor_parallel > 1 and not sharded:
        keep_grads_in_place(model)
    optimizer = build_optimizer(model.parameters(), job)
    if prec_cfg.fp8_all_gather:  # one scale computation for every float8 weight, after each step
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        optimizer.register_step_post_hook(
            lambda *_: precompute_float8_dynamic_scale_for_fsdp(model))
    scaler = prec.grad_scaler(prec_cfg.name, device, True, prec_cfg.init_scale,
                              prec_cfg.growth_interval)
    return model, optimizer, scaler
