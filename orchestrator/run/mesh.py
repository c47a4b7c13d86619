"""One named device mesh for every dimension a torch job uses, and tensor parallelism on it.

Dimensions, outermost first: `pp` (pipeline stages), `dp_replicate` (HSDP's replicas),
`dp_shard` (FSDP2's shard group, or DDP's ranks beside a pipeline), `tp` (tensor parallelism,
innermost: consecutive ranks, so a group stays in one node); `dp_shard` always, the others
when larger than 1 (a plain FSDP2 job gets a 1-D mesh). Their product
is the world size (checked before launch, planning/mesh.py); the data stream splits over the
data-parallel ranks only (config/derived.py: `data_parallel_rank`).

`tensor_parallelize` applies Megatron's layout (models/tensor_parallel.py) with sequence
parallelism, as torchtitan does for Llama, adapted to transformers' Llama, whose decoder stack
derives positions and the causal mask from the embedding's output: that output stays whole
(the vocabulary-parallel embedding's partial sums are all-reduced), and the first block takes
its own slice of the sequence. From there the residual stream is sharded by sequence: norms
run on each rank's slice; attention and MLP gather the sequence, compute their own heads or
columns, and reduce-scatter back to slices; the final norm's slices are gathered for the
vocabulary-parallel head, whose logits stay split by vocabulary for the loss (torch's
`loss_parallel`, entered by the engine around forward and backward).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from orchestrator.models.build import transformer_blocks
from orchestrator.models.tensor_parallel import COLWISE, PLANS

PP, DP_REPLICATE, DP_SHARD, TP = "pp", "dp_replicate", "dp_shard", "tp"
CP, CP_REPLICA = "cp", "cp_replica"  # context parallelism's own 2-D mesh (`context_mesh`)


def device_mesh(device: str, world_size: int, replicas: int, tp: int, pp: int = 1) -> DeviceMesh:
    """The job's mesh: P stages x R replicas x world/(P·R·T) shards x T tensor-parallel ranks."""
    sizes = {PP: pp, DP_REPLICATE: replicas, DP_SHARD: world_size // (pp * replicas * tp),
             TP: tp}
    dims = {name: n for name, n in sizes.items() if n > 1 or name == DP_SHARD}
    return init_device_mesh(device, tuple(dims.values()), mesh_dim_names=tuple(dims))


def context_mesh(device: str, world_size: int, c: int) -> DeviceMesh:
    """The C ranks that split each sequence (context parallelism): runs of C consecutive ranks,
    inside the data-parallel dimensions FSDP2 shards over (config/derived.py:
    `data_parallel_rank` gives them one share of the data)."""
    return init_device_mesh(device, (world_size // c, c), mesh_dim_names=(CP_REPLICA, CP))[CP]


def data_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The data-parallel part of `mesh` (FSDP2 shards over it; HSDP when it is 2-D)."""
    if DP_REPLICATE in (mesh.mesh_dim_names or ()):
        return mesh[(DP_REPLICATE, DP_SHARD)]
    return mesh[DP_SHARD]


def _linear(kind: str, **kwargs: Any) -> ParallelStyle:
    return ColwiseParallel(**kwargs) if kind == COLWISE else RowwiseParallel(**kwargs)


def _block_plan(block: nn.Module, plan: dict[str, tuple[str, int]]) -> dict[str, ParallelStyle]:
    """A decoder block: column-wise projections take the gathered sequence, row-wise ones
    reduce-scatter their output back to sequence slices."""
    styles: dict[str, ParallelStyle] = {
        "input_layernorm": SequenceParallel(),
        "post_attention_layernorm": SequenceParallel(),
        "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                        desired_input_kwarg_layouts={
                                            "hidden_states": Replicate()}),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
    }
    for name, _ in block.named_modules():
        kind = plan.get(name.rsplit(".", 1)[-1])
        if kind is not None and name:
            out = {} if kind[0] == COLWISE else {"output_layouts": Shard(1)}
            styles[name] = _linear(kind[0], **out)
    return styles


def held_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks this rank holds: all of them, or a pipeline stage's (the other
    stages' blocks are empty modules there, and the stage may hold no embedding or head)."""
    return [b for b in transformer_blocks(model) if any(True for _ in b.parameters())]


def tensor_parallelize(model: nn.Module, tp_mesh: DeviceMesh, family: str) -> None:
    """Split `model`'s layers over `tp_mesh` in place. Each rank keeps its own slice of its own
    weights (`src_data_rank=None`: no communication); on ranks built on the meta device they
    stay meta, and the strategy then fills every rank's slices from rank 0's full weights."""
    plan = PLANS[family]
    blocks = held_blocks(model)
    tied = tied_head(model)
    for block in blocks:
        parallelize_module(block, tp_mesh, _block_plan(block, plan), src_data_rank=None)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder.embed_tokens is not None:
        # the whole embedding output enters the first block, which keeps its slice of it
        parallelize_module(blocks[0], tp_mesh, PrepareModuleInput(
            input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
            use_local_output=True))
        parallelize_module(decoder.embed_tokens, tp_mesh,
                           RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
                           src_data_rank=None)
    if decoder.norm is not None:
        parallelize_module(decoder.norm, tp_mesh, SequenceParallel(), src_data_rank=None)
    if head is not None:
        # the logits stay split by vocabulary: the loss is computed on them under
        # `loss_parallel` (the engine's loss_context), never gathering s·b·V values on a rank
        parallelize_module(head, tp_mesh,
                           ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1),
                                           use_local_output=False),
                           src_data_rank=None)
    if tied:
        retie(model)


def tied_head(model: nn.Module) -> bool:
    """Whether the head is the input embedding itself (`model.tie_embeddings`)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def retie(model: nn.Module) -> None:
    """Make the head share the embedding's weight again. Splitting the embedding and the head
    each distributes its own `weight` (the vocabulary-parallel embedding and head both split
    it by vocabulary rows: one layout), and materializing or loading may swap in new
    parameter objects: without this the two would train as separate copies."""
    model.get_output_embeddings().weight = model.get_input_embeddings().weight


def keep_grads_in_place(model: nn.Module) -> None:
    """Give each gradient its parameter's layout as soon as it is accumulated (without FSDP2,
    which does this itself). DTensor's cheapest backward leaves two otherwise: the
    vocabulary-parallel embedding's gradient whole on every rank (V·H instead of V·H/T
    between backward and the step) and the sequence-parallel norms' as partial sums (reduced
    later, inside the optimizer step)."""
    def place(param: Any) -> None:
        grad = param.grad
        if isinstance(grad, DTensor) and grad.placements != param.placements:
            param.grad = grad.redistribute(placements=param.placements)

    for param in model.parameters():
        if isinstance(param, DTensor) and param.requires_grad:
            param.register_post_accumulate_grad_hook(place)
