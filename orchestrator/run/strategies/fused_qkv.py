"""GPT-2's fused attention projection under tensor parallelism. `c_attn` computes [q | k | v]
in one matmul, so a plain column split would give rank 0 all of q and part of k. Its columns
are regrouped before the split, [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] (Megatron-LM stores its fused
projection per head group for the same reason), so that each rank's slice holds its own heads'
q, k and v, and the attention splits its local output in three (run/mesh.py).

Only the ranks see that order. Checkpoints and the saved model hold the columns as
transformers does ([q | k | v], any layout reads them): `to_checkpoint` gathers each regrouped
tensor whole and restores the order (the weight, the bias and their optimizer moments); on
load `from_checkpoint` regroups what DCP read and keeps this rank's slice. That costs each rank
the whole c_attn of every block (a quarter of a block's weights, three times with Adam's
moments) for the duration of a save or load.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from orchestrator.models.tensor_parallel import FUSED_QKV, split_dim


def regroup(t: torch.Tensor, dim: int, tp: int, inverse: bool = False) -> torch.Tensor:
    """[q | k | v] along `dim` -> each of `tp` ranks' [q_r k_r v_r] in turn (or back)."""
    shape = list(t.shape)
    outer = (tp, 3) if inverse else (3, tp)
    split = t.reshape(*shape[:dim], *outer, shape[dim] // (3 * tp), *shape[dim + 1:])
    return split.transpose(dim, dim + 1).reshape(shape)


def regroup_state(state: dict[str, torch.Tensor], family: str, tp: int,
                  inverse: bool = False) -> None:
    """`regroup` every fused projection's weight and bias in a whole state dict, in place."""
    for name in fused_names(state, family):
        state[name] = regroup(state[name], split_dim(family, name), tp, inverse)


def fused_names(names: Any, family: str) -> list[str]:
    """The fused projection's parameters among `names` (e.g. `transformer.h.0.attn.c_attn.bias`)."""
    fused = FUSED_QKV.get(family)
    return [n for n in names if fused and n.split(".")[-2:-1] == [fused]]


class FusedQKV:
    """The checkpoint side: the regrouped tensors whole and in transformers' order."""

    def __init__(self, model: nn.Module, family: str, tp: int) -> None:
        self.family, self.tp = family, tp
        self.names = fused_names(dict(model.named_parameters()), family)
        self.placed: dict[str, DTensor] = {}  # key -> the tensor it replaced (mesh, placements)

    def _keys(self, optim: dict[str, Any]) -> list[tuple[dict[str, Any], str, str]]:
        """(dict, key, parameter name) of every fused tensor in the two state dicts."""
        out = []
        for name in self.names:
            out += [(optim, k, name) for k in optim
                    if k.startswith(f"state.{name}.") and isinstance(optim[k], DTensor)]
        return out

    def to_checkpoint(self, model: dict[str, Any], optim: dict[str, Any]) -> None:
        """Each regrouped tensor gathered whole (a collective) in transformers' order."""
        entries = [(model, name, name) for name in self.names if name in model]
        for state, key, name in entries + self._keys(optim):
            self.placed[key] = state[key]
            whole = state[key].full_tensor()
            state[key] = regroup(whole, split_dim(self.family, name), self.tp, inverse=True)

    def from_checkpoint(self, model: dict[str, Any], optim: dict[str, Any]) -> None:
        """What DCP read regrouped and sliced back onto this rank's layout."""
        for state in (model, optim):
            for key in [k for k in state if k in self.placed]:
                name = key if key in self.names else key.split(".", 1)[1].rsplit(".", 1)[0]
                like = self.placed.pop(key)
                grouped = regroup(state[key], split_dim(self.family, name), self.tp)
                state[key] = distribute_tensor(grouped.to(like.dtype), like.device_mesh,
                                               like.placements, src_data_rank=None)

    def to_whole(self, state: dict[str, torch.Tensor]) -> None:
        """A whole state dict (the saved model) back in transformers' order."""
        regroup_state(state, self.family, self.tp, inverse=True)
