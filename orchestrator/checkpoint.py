"""The trained model, saved once at the end of a run in Hugging Face format (`<run_dir>/model`),
so the next lifecycle step loads it with `model.pretrained_path`. LoRA runs save the model with
the adapters merged in, and the adapter alone under `model/adapter` (peft's format).

Written to a temporary directory and renamed into place: an interrupted save never leaves a
half-written `model/`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from orchestrator.data.tokenizer import TOKENIZER_JSON, ByteTokenizer
from orchestrator.models.lora import is_lora, merged_state_dict
from orchestrator.models.preference import policy_only
from orchestrator.strategies.base import Engine

MODEL_DIR = "model"
TOKENIZER_FILE = "orchestrator_tokenizer.json"
ADAPTER_DIR = "adapter"  # LoRA runs: peft's adapter files, beside the merged model


def save_final(engine: Engine, run_dir: str | Path, rank: int,
               tokenizer_json: Path | None = None) -> Path | None:
    state = engine.full_state_dict()  # collective
    if rank != 0:
        return None
    final = Path(run_dir) / MODEL_DIR
    tmp = Path(run_dir) / f".{MODEL_DIR}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model, state = policy_only(engine.hf_model(), state)  # DPO: not the reference
    if is_lora(model):  # a plain model with the adapters merged in, and the adapter alone
        model.get_base_model().save_pretrained(tmp, state_dict=merged_state_dict(model, state))
        model.save_pretrained(tmp / ADAPTER_DIR, state_dict=state)
    else:
        model.save_pretrained(tmp, state_dict=state)
    if tokenizer_json is not None:  # BPE: the model travels with its vocabulary
        shutil.copy(tokenizer_json, tmp / TOKENIZER_JSON)
    else:
        tok = ByteTokenizer()
        (tmp / TOKENIZER_FILE).write_text(json.dumps(
            {"type": "byte", "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
             "eos_id": tok.eos_id}) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
