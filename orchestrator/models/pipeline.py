"""Pipeline parallelism's split of a model into stages, as plain data (no torch): which blocks
and which of the other parameters each stage holds. The ranks split the model with it
(run/strategies/pipeline.py); the planner counts the same stages (planning/plan.py).

Blocks go to stages in order, as evenly as they divide; when they do not, the extra blocks go
to the middle stages first, since the first stage also holds the embedding and the last the
final norm and the head (torchtitan balances its splits the same way). With V stages per rank
(interleaved schedules) there are P·V stages, and stage k runs on rank k mod P (torch's
looped placement: rank r holds stages r, r + P, ...), or V-shaped for zbv (rank r holds
stages r and 2P - 1 - r).
"""

from __future__ import annotations

import dataclasses
import re

from orchestrator.models.specs import ParamSpec

FAMILIES = ("llama", "gpt2")  # the families cut into stages (run/strategies/pipeline_stage.py)
# the root modules the first stage holds (Llama's embedding, GPT-2's token and position
# embeddings); the other root parameters (final norm, head) are the last stage's
FIRST_STAGE_ROOT = ("embed_tokens", "wte", "wpe")
HEAD = "lm_head.weight"  # the causal LM's output projection (both families)
_BLOCK = re.compile(r"\.(?:layers|h)\.(\d+)\.")  # a block's parameter: Llama's, GPT-2's


def stage_blocks(n_layer: int, stages: int) -> list[range]:
    """The block indices of each stage."""
    base, extra = divmod(n_layer, stages)
    middle_first = sorted(range(stages), key=lambda s: (s in (0, stages - 1), s))
    sizes = [base + (1 if middle_first.index(s) < extra else 0) for s in range(stages)]
    out, start = [], 0
    for size in sizes:
        out.append(range(start, start + size))
        start += size
    return out


def stage_of(name: str, n_layer: int, stages: int) -> int:
    """The stage holding parameter `name` (e.g. `model.layers.3.mlp.up_proj.weight`,
    `transformer.h.3.mlp.c_fc.weight`)."""
    found = _BLOCK.search(name)
    if found:
        block = int(found.group(1))
        return next(i for i, r in enumerate(stage_blocks(n_layer, stages)) if block in r)
    return 0 if any(f".{m}." in f".{name}" for m in FIRST_STAGE_ROOT) else stages - 1


V_SHAPED = ("zbv",)  # schedules whose 2 stages per rank are placed V-shaped


def stages_of_rank(rank: int, ranks: int, per_rank: int, schedule: str = "1f1b") -> list[int]:
    """The stages pipeline rank `rank` of `ranks` holds, `per_rank` of them: looped (rank r holds
    r, r + P, ...), or V-shaped for zbv (r and 2P - 1 - r: the first and last stage on rank 0)."""
    if schedule in V_SHAPED:
        return [rank, 2 * ranks - 1 - rank]
    return [rank + v * ranks for v in range(per_rank)]


def rank_of_stage(stage: int, ranks: int, per_rank: int, schedule: str = "1f1b") -> int:
    """The pipeline rank holding `stage`."""
    return next(r for r in range(ranks) if stage in stages_of_rank(r, ranks, per_rank, schedule))


def rank_specs(specs: list[ParamSpec], n_layer: int, ranks: int, per_rank: int,
               rank: int, schedule: str = "1f1b") -> list[ParamSpec]:
    """The parameters pipeline rank `rank` holds: those of all its stages."""
    mine = set(stages_of_rank(rank, ranks, per_rank, schedule))
    stages = ranks * per_rank
    held = [s for s in specs if stage_of(s.name, n_layer, stages) in mine]
    if stages - 1 in mine:  # a tied head: the last stage's own copy (zbv's rank 0 too)
        held += [dataclasses.replace(s, name=HEAD) for s in specs
                 if s.head and stage_of(s.name, n_layer, stages) == 0]
    return held
