"""A head tied to the input embedding (`model.tie_embeddings`: GPT-2's default, Llama 3.2's)
under pipeline parallelism: the first stage holds the embedding, the last the head, so the one
weight becomes two copies on two ranks, kept equal as Megatron-LM keeps them. Both start from
rank 0's weight; after each step's backward the two gradients are summed over a group of each
such pair of ranks (the same data-parallel and tensor-parallel place on the first and the last
stage), so the same optimizer step moves both alike; the global gradient norm counts the
weight once. Checkpoints hold it as the unpipelined tied model does: under the embedding's name
(written once), the optimizer state too, so they resume under any layout.

When one rank holds both stages (zbv's V shape puts the first and last stage on rank 0) the
head gets a copy there too: torch's zero-bubble weight backward runs per stage and does not
take one parameter shared by two of them (its losses drifted 9e-3 from DDP's in 10 steps).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from orchestrator.models.pipeline import HEAD


class SharedHead:
    """A tie the ranks keep as one parameter (tensor parallelism): checkpoints hold it as the
    model's state dict names it; the saved model gets one tensor under both names, as
    save_pretrained expects of a tie."""

    def __init__(self, embedding: str) -> None:
        self.embedding = embedding

    def to_checkpoint(self, model: dict[str, Any], optim: dict[str, Any]) -> None:
        pass

    def from_checkpoint(self, model: dict[str, Any], optim: dict[str, Any]) -> None:
        pass

    def to_whole(self, state: dict[str, torch.Tensor]) -> None:
        state[HEAD] = state[self.embedding]


class TiedCopies(SharedHead):
    """This rank's copies of a tied weight: the head's or the embedding's (the other on
    another rank), both (zbv's rank 0), or none (a middle stage)."""

    def __init__(self, embedding: str, mesh: DeviceMesh, first: int, last: int,
                 model: nn.Module) -> None:
        """`embedding`: the tied weight's name under the embedding; `first`, `last`: the
        pipeline ranks holding the first and the last stage; `model`: this rank's stages, as
        trained (`untie` first). Every rank calls this: it creates the pairs' process
        groups."""
        super().__init__(embedding)
        self.group = None
        if first != last:
            grid = mesh.mesh  # pp outermost: grid[p] holds pipeline rank p's ranks
            pairs = [[int(a), int(b)] for a, b in zip(grid[first].flatten(),
                                                      grid[last].flatten(), strict=True)]
            self.group, _ = dist.new_subgroups_by_enumeration(pairs)
        params = dict(model.named_parameters())
        self.params = [params[name] for name in (embedding, HEAD) if name in params]
        self.head_only = HEAD in params and embedding not in params

    def sync(self) -> None:
        """Sum the two copies' gradients (each rank's shard of them under FSDP2)."""
        grads = [_local(p.grad) for p in self.params if p.grad is not None]
        if len(grads) == 2:
            grads[0].add_(grads[1])
            grads[1].copy_(grads[0])
        elif grads and self.group is not None:
            dist.all_reduce(grads[0], group=self.group)

    def copies(self, param: torch.Tensor) -> int:
        """2 for a copy (the gradient norm counts the weight once), else 1."""
        return 2 if any(param is p for p in self.params) else 1

    def to_checkpoint(self, model: dict[str, Any], optim: dict[str, Any]) -> None:
        """The state as the tied model's (in place): the head's weight also under the
        embedding's name, its optimizer state only under it."""
        if self.head_only:
            model[self.embedding] = model[HEAD]
            _rename(optim, HEAD, self.embedding)
        elif len(self.params) == 2:  # the head's optimizer state equals the embedding's
            for key in _keys(optim, HEAD):
                del optim[key]

    def from_checkpoint(self, model: dict[str, Any], optim: dict[str, Any]) -> None:
        """Back to this rank's own names before the state is set."""
        if self.head_only:
            del model[self.embedding]
            _rename(optim, self.embedding, HEAD)
        elif len(self.params) == 2:  # the head's own copy of the embedding's state
            for key in _keys(optim, self.embedding):
                value = optim[key]
                head_key = key.replace(self.embedding, HEAD, 1)
                optim[head_key] = value.clone() if isinstance(value, torch.Tensor) else value


def _local(grad: torch.Tensor) -> torch.Tensor:
    return grad.to_local() if isinstance(grad, DTensor) else grad


def _keys(optim: dict[str, Any], name: str) -> list[str]:
    """The flat optimizer state's keys of parameter `name`."""
    return [k for k in optim if f".{name}." in f"{k}."]


def _rename(optim: dict[str, Any], old: str, new: str) -> None:
    """`state.<old>.exp_avg` -> `state.<new>.exp_avg`, and the `param_groups.<old>.*` keys (or,
    in checkpoints written before c9b976b, the nested `state` and `param_groups` entries)."""
    state = optim.get("state")
    if isinstance(state, dict) and old in state:
        state[new] = state.pop(old)
        for group in optim.get("param_groups", []):
            group["params"] = [new if name == old else name for name in group["params"]]
        return
    for key in _keys(optim, old):
        prefix, rest = key.split(f".{old}", 1)
        optim[f"{prefix}.{new}{rest}"] = optim.pop(key)


def untie(model: nn.Module, embedding: str) -> None:
    """Give the head its own copy of the weight where this rank holds both stages."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if embedding in params and HEAD in params:
        model.get_output_embeddings().weight = nn.Parameter(params[HEAD].detach().clone())
