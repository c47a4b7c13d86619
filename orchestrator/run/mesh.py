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

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import (
    DTensor,
    Replicate,
    Shard,
    distribute_module,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from orchestrator.models.build import transformer_blocks
from orchestrator.models.layout import LAYOUTS
from orchestrator.models.tensor_parallel import COLWISE, FUSED_QKV, PLANS

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


# family -> (the block's norms, its attention module, whether the block passes attention its
# input by keyword)
BLOCK_PARTS = {"llama": (("input_layernorm", "post_attention_layernorm"), "self_attn", True),
               "gpt2": (("ln_1", "ln_2"), "attn", False)}


def _block_plan(block: nn.Module, family: str) -> dict[str, ParallelStyle]:
    """A decoder block: column-wise projections take the gathered sequence, row-wise ones
    reduce-scatter their output back to sequence slices (nn.Linear's; GPT-2's Conv1D layers
    are split by `_conv1d`)."""
    norms, attention, by_keyword = BLOCK_PARTS[family]
    gather = ({"input_kwarg_layouts": {"hidden_states": Shard(1)},
               "desired_input_kwarg_layouts": {"hidden_states": Replicate()}} if by_keyword
              else {"input_layouts": (Shard(1),), "desired_input_layouts": (Replicate(),)})
    styles: dict[str, ParallelStyle] = {name: SequenceParallel() for name in norms}
    styles[attention] = PrepareModuleInput(**gather)
    styles["mlp"] = PrepareModuleInput(input_layouts=(Shard(1),),
                                       desired_input_layouts=(Replicate(),))
    for name, module in block.named_modules():
        kind = PLANS[family].get(name.rsplit(".", 1)[-1])
        if kind is not None and name and isinstance(module, nn.Linear):
            out = {} if kind[0] == COLWISE else {"output_layouts": Shard(1)}
            styles[name] = _linear(kind[0], **out)
    return styles


def _place(module: nn.Module, mesh: DeviceMesh, placement: Any) -> None:
    """`module`'s own parameters as DTensors, each at `placement(name)`; every rank keeps its
    own slice of what it holds (`src_data_rank=None`: no communication)."""
    for name, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(name, nn.Parameter(
            distribute_tensor(param, mesh, [placement(name)], src_data_rank=None)))


def _conv1d(module: nn.Module, mesh: DeviceMesh, kind: str) -> None:
    """transformers' Conv1D (y = x W + b, W stored (in, out)) split as a linear layer is:
    column-wise, W by columns and b with them, the gathered sequence in, this rank's columns
    out; row-wise, W by rows, b whole (added once to the reduced sum), this rank's columns
    in, the sum reduce-scattered to sequence slices out."""
    column = kind == COLWISE

    def partition(_: str, mod: nn.Module, mesh: DeviceMesh) -> None:
        _place(mod, mesh, lambda name: (Shard(1) if name == "weight" else Shard(0)) if column
               else (Shard(0) if name == "weight" else Replicate()))

    def inputs(_: nn.Module, args: tuple, mesh: DeviceMesh) -> tuple:
        place = Replicate() if column else Shard(-1)
        x = args[0]
        x = (x.redistribute(mesh, [place]) if isinstance(x, DTensor)
             else DTensor.from_local(x, mesh, [place], run_check=False))
        return (x, *args[1:])

    def output(_: nn.Module, out: DTensor, mesh: DeviceMesh) -> Any:
        return out.to_local() if column else out.redistribute(mesh, [Shard(1)]).to_local()

    distribute_module(module, mesh, partition, inputs, output)


def _replicate(module: nn.Module, mesh: DeviceMesh) -> None:
    """A module every rank holds whole (GPT-2's position embedding), its inputs and outputs
    plain tensors."""
    def inputs(_: nn.Module, args: tuple, mesh: DeviceMesh) -> tuple:
        return (DTensor.from_local(args[0], mesh, [Replicate()], run_check=False), *args[1:])

    def partition(_: str, mod: nn.Module, mesh: DeviceMesh) -> None:
        _place(mod, mesh, lambda _: Replicate())

    distribute_module(module, mesh, partition, inputs, lambda _, out, __: out.to_local())


def _sequence_slice(mesh: DeviceMesh) -> Any:
    """A forward pre-hook: the module's first input (the whole sequence, on every rank) cut to
    this rank's slice of the sequence (its gradient is gathered back in backward). A hook of its
    own, as transformers passes a block a varying number of positional inputs; run eagerly
    even in a compiled block: traced into the block's graph, the embedding received no
    gradient (torch 2.13)."""
    def hook(_: nn.Module, args: tuple) -> tuple:
        whole = DTensor.from_local(args[0], mesh, [Replicate()], run_check=False)
        return (whole.redistribute(mesh, [Shard(1)]).to_local(), *args[1:])

    return torch.compiler.disable(hook)


def held_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks this rank holds: all of them, or a pipeline stage's (the other
    stages' blocks are empty modules there, and the stage may hold no embedding or head)."""
    return [b for b in transformer_blocks(model) if any(True for _ in b.parameters())]


def _split_block(block: nn.Module, tp_mesh: DeviceMesh, family: str) -> None:
    from transformers.pytorch_utils import Conv1D

    for name, module in block.named_modules():
        kind = PLANS[family].get(name.rsplit(".", 1)[-1])
        if kind is not None and isinstance(module, Conv1D):
            _conv1d(module, tp_mesh, kind[0])
    parallelize_module(block, tp_mesh, _block_plan(block, family), src_data_rank=None)
    fused = FUSED_QKV.get(family)
    attention = getattr(block, BLOCK_PARTS[family][1])
    if fused is not None:  # each rank's [q | k | v] columns: its own heads' (fused_qkv.py)
        attention.split_size //= tp_mesh.size()


def tensor_parallelize(model: nn.Module, tp_mesh: DeviceMesh, family: str) -> None:
    """Split `model`'s layers over `tp_mesh` in place. Each rank keeps its own slice of its own
    weights (`src_data_rank=None`: no communication); on ranks built on the meta device they
    stay meta, and the strategy then fills every rank's slices from rank 0's full weights."""
    layout = LAYOUTS[family]
    blocks = held_blocks(model)
    tied = tied_head(model)
    for block in blocks:
        _split_block(block, tp_mesh, family)
    stack, head = getattr(model, layout.stack), model.get_output_embeddings()
    embed = getattr(stack, layout.embeddings[0])
    if embed is not None:
        # the whole embedding output enters the first block, which keeps its slice of it
        blocks[0].register_forward_pre_hook(_sequence_slice(tp_mesh))
        parallelize_module(embed, tp_mesh,
                           RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
                           src_data_rank=None)
        for name in layout.embeddings[1:]:  # GPT-2's positions: whole on every rank
            _replicate(getattr(stack, name), tp_mesh)
    norm = getattr(stack, layout.norm)
    if norm is not None:
        parallelize_module(norm, tp_mesh, SequenceParallel(), src_data_rank=None)
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
    """Whether the head is the input embedding itself (`model.tie_embeddings`); False for a
    model that is not a transformers causal LM (e.g. DPO's policy-and-reference pair)."""
    outputs, inputs = (getattr(model, name, None) for name in ("get_output_embeddings",
                                                              "get_input_embeddings"))
    if outputs is None or inputs is None:
        return False
    head, embed = outputs(), inputs()
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
