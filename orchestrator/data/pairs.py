"""SFT and DPO data through the same prepare step as text: prompt/response rows (`jsonl_sft`)
and preference pairs (`jsonl_pref`) are tokenized once before launch into fixed-length arrays
(`.npy`, memory-mapped by every rank) with their label masks, beside a manifest keyed like a
prepared corpus (the source's size and mtime, the tokenizer, `data.seq_len`, the template).

With `data.chat_template=true` the prompt is rendered by the tokenizer's own chat template as
one user turn followed by the assistant's generation prompt, so a fine-tuned model learns the
format it will be prompted with; only the answer and its end-of-text carry labels.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from orchestrator.config.schema import JobConfig
from orchestrator.data.cache import MANIFEST, check_cache_dir, remove_stale_tmp
from orchestrator.data.prepare import file_sha256, is_current, tokenizer_key

ARRAYS = {"jsonl_sft": ("input_ids", "labels"),
          "jsonl_pref": ("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                         "rejected_labels")}


def chat_prompt(tok: Any, prompt: str) -> str:
    """`prompt` as one user turn in the tokenizer's chat template, ending where the
    assistant's answer starts."""
    return tok.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)


def _source(job: JobConfig) -> Path:
    from orchestrator.data.corpus import build_preferences, build_sft

    if job.data.path:
        return Path(job.data.path).absolute()
    return build_sft() if job.data.name == "jsonl_sft" else build_preferences()


def _key(job: JobConfig) -> dict[str, Any]:
    from orchestrator.data.settings import tokenizer_file, uses_bpe

    tok = tokenizer_file(job) if uses_bpe(job) else None
    return {**tokenizer_key(tok), "name": job.data.name, "seq_len": job.data.seq_len,
            "chat_template": job.data.chat_template}


def pairs_dir(job: JobConfig) -> Path:
    from orchestrator.common.files import cache_dir

    if job.data.cache_dir is not None:
        return Path(job.data.cache_dir)
    source = _source(job)
    key = hashlib.sha256(json.dumps([str(source), _key(job)]).encode()).hexdigest()[:12]
    return cache_dir() / "data" / f"{source.stem}-{key}"


def _rows(job: JobConfig) -> dict[str, np.ndarray]:
    """Every row tokenized (`datasets.labelled_pair`, the same as the in-memory sets), as
    arrays; a row that cannot be used raises ValueError naming file:line."""
    from orchestrator.data.datasets import REQUIRED_KEYS, labelled_pair, read_jsonl
    from orchestrator.data.settings import get_tokenizer

    tok, d = get_tokenizer(job), job.data
    source = _source(job)
    names = ARRAYS[d.name]
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    answers = REQUIRED_KEYS[d.name][1:]
    for line_no, row in read_jsonl(str(source), REQUIRED_KEYS[d.name]):
        prompt = chat_prompt(tok, row["prompt"]) if d.chat_template else row["prompt"]
        try:
            pairs = [labelled_pair(tok, prompt, row[a], d.seq_len, a) for a in answers]
        except ValueError as e:
            raise ValueError(f"{source}:{line_no}: {e}") from None
        for i, (ids, labels) in enumerate(pairs):
            out[names[2 * i]].append(ids)
            out[names[2 * i + 1]].append(labels)
    if not out[names[0]]:
        raise ValueError(f"{source}:1: no rows")
    dtype = np.uint32 if tok.vocab_size > np.iinfo(np.uint16).max + 1 else np.uint16
    return {n: (torch.stack(v).numpy().astype(np.int32 if "labels" in n else dtype))
            for n, v in out.items()}


def prepare_pairs(job: JobConfig) -> tuple[Path, bool]:
    """Tokenize the job's SFT or preference rows into its cache directory unless that is
    current (one launch at a time: a lock beside it). Returns (directory, whether built)."""
    from orchestrator.common.errors import DataError

    source, key, out = _source(job), _key(job), pairs_dir(job)
    if job.data.cache_dir is not None:  # before anything is tokenized or written
        check_cache_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(f".{out.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_current(out, [source], key):
            return out, False
        try:
            arrays = _rows(job)
        except ValueError as e:
            raise DataError(f"data: {e}") from None
        remove_stale_tmp(out)
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", array)
            st = source.stat()
            manifest = {"sources": [{"path": str(source), "size": st.st_size,
                                     "mtime_ns": st.st_mtime_ns,
                                     "sha256": file_sha256(source)}],
                        "tokenizer": key, "rows": len(next(iter(arrays.values())))}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out, True


class PreparedRows(Dataset):
    """The prepared SFT or preference rows, memory-mapped: each item holds the arrays' rows
    as int64 tensors (labels keep their ignore index)."""

    def __init__(self, job: JobConfig) -> None:
        out, source = pairs_dir(job), _source(job)
        if not is_current(out, [source], _key(job)):
            raise ValueError(f"{source} is not prepared in {out} for these settings (or "
                             "changed since): launch through python -m orchestrator, or run "
                             "action=prepare with the same data settings first")
        self.arrays = {n: np.load(out / f"{n}.npy", mmap_mode="r")
                       for n in ARRAYS[job.data.name]}

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {n: torch.from_numpy(a[i].astype(np.int64)) for n, a in self.arrays.items()}
