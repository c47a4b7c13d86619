"""The trained model, saved once at the end of a run in Hugging Face format (`<run_dir>/model`),
so the next lifecycle step loads it with `model.pretrained_path`. LoRA runs save the model with
the adapters merged in, and the adapter alone under `model/adapter` (peft's format).

Written to a temporary directory and renamed into place: an interrupted save never leaves a
half-written `model/`, a failed one removes its temporary directory, and the previous `model/`
is only deleted once the new one has taken its name.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from orchestrator.data.tokenizer import (
    EOS,
    ByteTokenizer,
    HFTokenizer,
    hf_dir,
)
from orchestrator.models.lora import is_lora, merged_state_dict
from orchestrator.models.preference import policy_only
from orchestrator.run.metrics import NO_SPACE, DiskFull
from orchestrator.run.strategies.base import Engine

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
    try:
        _write(engine, state, tmp, tokenizer_json)
        _swap_in(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _out_of_space(e):
            raise DiskFull(f"disk full saving the model to {final} (no space left on device); "
                           f"training finished but no new model was saved", errno.ENOSPC) from e
        raise
    return final


def _out_of_space(e: BaseException) -> bool:
    """ENOSPC/EDQUOT, also from safetensors, whose Rust I/O errors end in "(os error N)"."""
    if isinstance(e, OSError):
        return e.errno in NO_SPACE
    return any(f"(os error {code})" in str(e) for code in NO_SPACE)


def _write(engine: Engine, state: dict, tmp: Path, tokenizer_json: Path | None) -> None:
    """The model (and its tokenizer) in Hugging Face format under `tmp`."""
    model, state = policy_only(engine.hf_model(), state)  # DPO: not the reference
    base = model.get_base_model() if is_lora(model) else model
    bos, eos = special_ids(tokenizer_json)  # generate stops at the run's own end of text
    generation = getattr(base, "generation_config", None)  # None: BERT, which does not generate
    for config in (base.config, generation):
        if config is not None:
            config.bos_token_id, config.eos_token_id = bos, eos
    if is_lora(model):  # a plain model with the adapters merged in, and the adapter alone
        model.get_base_model().save_pretrained(tmp, state_dict=merged_state_dict(model, state))
        model.save_pretrained(tmp / ADAPTER_DIR, state_dict=state)
    else:
        model.save_pretrained(tmp, state_dict=state)
    write_tokenizer(tmp, tokenizer_json)


def special_ids(tokenizer_json: Path | None) -> tuple[int, int]:
    """(bos, eos) of the run's tokenizer: bytes, a Hugging Face tokenizer's own (bos = eos
    when it has none), or our BPE's end of text (GPT-2's convention: both)."""
    if tokenizer_json is None:
        return ByteTokenizer.bos_id, ByteTokenizer.eos_id
    folder = hf_dir(tokenizer_json)
    if folder is not None:
        tok = HFTokenizer(folder).tok
        return (tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
                tok.eos_token_id)
    data = json.loads(Path(tokenizer_json).read_text())  # our BPE: its end of text
    ids = {**data["model"]["vocab"], **{t["content"]: t["id"] for t in data["added_tokens"]}}
    return ids[EOS], ids[EOS]


def write_tokenizer(out: Path, tokenizer_json: Path | None) -> None:
    """The run's tokenizer files into the model directory `out` (also QAT's int8 model)."""
    if tokenizer_json is not None and hf_dir(tokenizer_json) is not None:
        HFTokenizer(hf_dir(tokenizer_json)).tok.save_pretrained(out)  # AutoTokenizer reads it
    elif tokenizer_json is not None:  # BPE: the model travels with its vocabulary, which
        # AutoTokenizer reads with its end of text (tokenizer_config.json beside it)
        from transformers import PreTrainedTokenizerFast

        PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), bos_token=EOS,
                                eos_token=EOS).save_pretrained(out)
    else:
        tok = ByteTokenizer()
        (out / TOKENIZER_FILE).write_text(json.dumps(
            {"type": "byte", "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
             "eos_id": tok.eos_id}) + "\n")


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` to `final`. An existing `final` is first renamed aside (and put
    back if the move fails), and deleted only after the new one is in place, so at every moment
    one complete model is on disk."""
    if not os.path.lexists(final):
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
