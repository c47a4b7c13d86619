"""ZeRO stages 2 and 3 on FSDP2 (`fully_shard`), one unit per transformer block plus the root.

Stage 2: `reshard_after_forward=False` — parameters are sharded at rest, gathered for forward
and kept until backward ends; gradients and optimizer state are sharded.
Stage 3: `reshard_after_forward=True` — each block's parameters are freed after its forward and
gathered again in backward. The root group (embeddings, final norm, head) is not resharded
after forward: backward needs it first, so freeing it would only add an all-gather.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from orchestrator.config.schema import JobConfig
from orchestrator.models.build import transformer_blocks
from orchestrator.run import precision as prec
from orchestrator.run.strategies.base import (
    Engine,
    broadcast_from_rank0,
    build_optimizer,
    materialize,
    on_meta,
)


class FSDPEngine(Engine):
    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # the MixedPrecisionPolicy casts parameters instead

    def _fsdp_params(self) -> Iterator[Any]:
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                group = module._get_fsdp_state()._fsdp_param_group
                if group is not None:
                    yield from group.fsdp_params

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)

    def held_tensors(self) -> dict[str, Iterable[torch.Tensor]]:
        params, grads = [], []
        for fp in self._fsdp_params():
            params.append(fp._sharded_param_data)  # the padded local shard
            unsharded = getattr(fp, "_unsharded_param", None)  # gathered copy, if alive
            if unsharded is not None:
                params.append(unsharded)
                if unsharded.grad is not None:
                    grads.append(unsharded.grad)
            if fp.sharded_param.grad is not None:
                grads.append(fp.sharded_param.grad)
        return {"params_bytes": params, "grads_bytes": grads,
                "optimizer_bytes": list(self.optimizer_state())}


def device_mesh(device: str, world_size: int, replicas: int) -> DeviceMesh:
    """1-D (every rank shards) or, with `replicas` R > 1, HSDP's 2-D mesh: R groups of
    world/R consecutive ranks (one node when world/R = GPUs per node); parameters are sharded
    within a group and replicated across groups, so all-gathers stay inside a node and only
    the gradient all-reduce crosses nodes."""
    if replicas == 1:
        return init_device_mesh(device, (world_size,))
    return init_device_mesh(device, (replicas, world_size // replicas),
                            mesh_dim_names=("replicate", "shard"))


def load_from_rank0(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Every rank's shards from rank 0's full state dict (`full` is empty elsewhere), one
    tensor at a time, then the buffers (non-persistent ones, e.g. rotary frequencies, are not in
    a state dict)."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    broadcast_from_rank0(model.buffers())


def setup(model: nn.Module, job: JobConfig, device: str) -> Engine:
    import torch.distributed as dist

    world = dist.get_world_size()
    # Rank 0 built the real model; the others built it on the meta device and allocate only
    # their shards after sharding. Rank 0's full weights are kept by reference until sent.
    full = model.state_dict() if world > 1 and not on_meta(model) else {}
    mesh = device_mesh(device, world, job.parallelism.replicate_degree)
    p = job.precision
    kwargs = {"mesh": mesh, "mp_policy": prec.fsdp_policy(p.name, p.param_dtype, p.reduce_dtype)}
    for block in transformer_blocks(model):
        fully_shard(block, reshard_after_forward=job.parallelism.zero_stage == 3, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)
    if world > 1:
        materialize(model, device)
        load_from_rank0(model, full)
        del full
    optimizer = build_optimizer(model.parameters(), job)
    if p.fp8_all_gather:  # one scale computation for every float8 weight, after each step
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        optimizer.register_step_post_hook(
            lambda *_: precompute_float8_dynamic_scale_for_fsdp(model))
    scaler = prec.grad_scaler(p.name, device, True, p.init_scale, p.growth_interval)
    return FSDPEngine(model, optimizer, job, device, scaler=scaler)
