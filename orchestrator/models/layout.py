"""Where each causal-LM family keeps its parts, as plain data (no torch): the decoder stack (an
attribute of the transformers causal-LM model), its list of blocks, its embeddings, the
parameter-free modules every block position uses, and its final norm; the head is the model's
`lm_head` in both (models/pipeline.py: HEAD). Pipeline stages (run/strategies/pipeline_stage.py)
and tensor parallelism (run/mesh.py) cut and split models by it.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Layout:
    stack: str
    blocks: str
    embeddings: tuple[str, ...]  # the token embedding first
    shared: tuple[str, ...]
    norm: str


LAYOUTS = {"llama": Layout("model", "layers", ("embed_tokens",), ("rotary_emb",), "norm"),
           "gpt2": Layout("transformer", "h", ("wte", "wpe"), ("drop",), "ln_f")}


def embedding_name(family: str) -> str:
    """The token embedding's weight, by name (a tied head's other name)."""
    layout = LAYOUTS[family]
    return f"{layout.stack}.{layout.embeddings[0]}.weight"
