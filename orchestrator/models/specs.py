"""Parameter shapes of a model, as the planner counts them: one `ParamSpec` per unique
parameter (models/build.py: `param_specs` builds the model on the meta device; spec_cache.py
keeps the count on disk)."""

from __future__ import annotations

from dataclasses import dataclass

ROOT_GROUP = "root"
# DPO: the policy's and the frozen reference's parameters, prefixed (models/preference.py)
POLICY, REFERENCE = "policy.", "reference."


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    group: str  # FSDP unit: "block.<i>" or "root"
    head: bool = False  # the output projection (tied embeddings: the shared weight)
    trainable: bool = True  # False: frozen (LoRA base weights): no gradient, no optimizer state
    # the weight of a linear layer (nn.Linear, GPT-2's Conv1D; not a head tied to the input
    # embedding): its output features, the rows int8 quantization scales one by one; 0 otherwise
    out_features: int = 0
    # an embedding's weight that is not also the output head: a lookup, no matmul (its FLOPs
    # are not 6 per token: planning/compute.py)
    lookup: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n
