"""Tensor parallelism's layout of a model, as plain data (no torch): which layers are split
column-wise or row-wise over the T ranks of a tensor-parallel group, and the shapes each rank
then holds. The ranks apply it with DTensor (run/mesh.py); the planner counts the same local
shapes (planning/plan.py), so the two cannot disagree.

Megatron-LM's layout (Shoeybi et al. 2019), as torchtitan applies it to Llama: attention's
q/k/v and the MLP's gate/up projections are split by output features (column-wise: each rank
computes its own heads and its own share of the hidden units), o_proj and down_proj by input
features (row-wise: each rank's partial sums are reduced); the embedding is split by vocabulary
rows and the head by vocabulary columns. Norms are replicated, and with sequence parallelism
(always on with TP here) they run on each rank's slice of the sequence.
"""

from __future__ import annotations

import dataclasses

from orchestrator.models.specs import ParamSpec

COLWISE, ROWWISE = "colwise", "rowwise"

# family -> {module name (last part of its path): (how it is split, weight dim split)}
PLANS: dict[str, dict[str, tuple[str, int]]] = {
    "llama": {
        "q_proj": (COLWISE, 0), "k_proj": (COLWISE, 0), "v_proj": (COLWISE, 0),
        "o_proj": (ROWWISE, 1),
        "gate_proj": (COLWISE, 0), "up_proj": (COLWISE, 0), "down_proj": (ROWWISE, 1),
        # an embedding's "row-wise" split is by vocabulary rows: dim 0 of its [V, H] weight
        "embed_tokens": (ROWWISE, 0),
        "lm_head": (COLWISE, 0),
    },
    # transformers' Conv1D stores its weight (in, out): column-wise splits dim 1, row-wise dim 0.
    # c_attn computes q, k and v in one matmul: its columns are regrouped before the split so
    # that each rank's are its own heads' q, k and v (`FUSED_QKV`, run/strategies/fused_qkv.py)
    "gpt2": {
        "c_attn": (COLWISE, 1), "c_proj": (ROWWISE, 0),  # attention's, and the MLP's c_proj
        "c_fc": (COLWISE, 1),
        "wte": (ROWWISE, 0), "lm_head": (COLWISE, 0),
    },
}
FUSED_QKV = {"gpt2": "c_attn"}  # family -> the module computing [q | k | v] in one matmul


def split_dim(family: str, name: str) -> int | None:
    """The dimension of parameter `name` (e.g. `model.layers.0.self_attn.q_proj.weight`) that
    tensor parallelism splits; None: every rank holds all of it (norms; a row-wise layer's
    bias, added once after the reduction)."""
    entry = _entry(family, name)
    if entry is None:
        return None
    style, dim = entry
    if name.endswith(".bias"):
        return 0 if style == COLWISE else None
    return dim


def _entry(family: str, name: str) -> tuple[str, int] | None:
    path = name.split(".")[:-1]
    return PLANS[family].get(path[-1]) if path else None


def local_specs(specs: list[ParamSpec], family: str, tp: int) -> list[ParamSpec]:
    """What one rank of a `tp`-way tensor-parallel group holds of each parameter (the checks
    before launch make every split even)."""
    if tp == 1:
        return specs
    out = []
    for s in specs:
        dim = split_dim(family, s.name)
        if dim is None:
            out.append(s)
            continue
        shape = tuple(n // tp if i == dim else n for i, n in enumerate(s.shape))
        column_wise = _entry(family, s.name) == (COLWISE, dim)  # output features split
        rows = s.out_features // tp if column_wise else s.out_features
        out.append(dataclasses.replace(s, shape=shape, out_features=rows))
    return out
