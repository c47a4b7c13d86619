"""Tokenize once (`action=prepare`): text sources → one flat memory-mapped token file, an index
of document ends and a manifest, in `data.cache_dir`.

Documents are those `PackedText` packs (a text file split at blank lines; a JSONL file's
`data.text_field` per line), each followed by end-of-text. They are tokenized by
`data.num_proc` worker processes in order, so the token file equals a single-process
tokenization exactly. The files are written into a temporary directory and renamed into place:
a cache directory holding a manifest is complete. Re-running with unchanged sources (size and
mtime as in the manifest) and the same tokenizer does nothing; anything else rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.schema import JobConfig

MANIFEST, TOKENS, INDEX = "manifest.json", "tokens.bin", "docs.idx"
CHUNK_CHARS = 1 << 20  # a text file is read this many characters at a time
BATCH_DOCS = 256  # documents per task sent to a worker


def documents(path: Path, text_field: str) -> Iterator[str]:
    """The documents of one source, streamed: a `.jsonl` file's `text_field` per line, any other
    file split at blank lines exactly as `str.split("\\n\\n")` would (empty ones dropped)."""
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            for n, line in enumerate(f, 1):
                if line.strip():
                    text = json.loads(line).get(text_field)
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{n}: no string field {text_field!r}")
                    yield text
            return
        rest = ""
        while chunk := f.read(CHUNK_CHARS):
            rest += chunk
            *whole, rest = rest.split("\n\n")
            yield from (d for d in whole if d.strip())
        if rest.strip():
            yield rest


_tokenizer: Any = None


def _start_worker(kind: str, path: str | None) -> None:
    global _tokenizer
    from orchestrator.data.tokenizer import BPETokenizer, ByteTokenizer

    _tokenizer = BPETokenizer(path) if kind == "bpe" else ByteTokenizer()


def _encode(docs: list[str]) -> list[list[int]]:
    return [_tokenizer.encode(d) + [_tokenizer.eos_id] for d in docs]


def _batches(paths: list[Path], text_field: str) -> Iterator[list[str]]:
    batch: list[str] = []
    for path in paths:
        for doc in documents(path, text_field):
            batch.append(doc)
            if len(batch) == BATCH_DOCS:
                yield batch
                batch = []
    if batch:
        yield batch


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _source_info(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def tokenizer_key(kind: str, tokenizer_file: Path | None) -> dict[str, Any]:
    return {"kind": kind, "sha256": file_sha256(tokenizer_file) if tokenizer_file else None}


def prepared_dir(job: JobConfig, sources: list[Path], tokenizer: dict[str, Any]) -> Path:
    """`data.cache_dir`, else `<cache>/data/<first source>-<key>` under the project's cache
    (`$ORCHESTRATOR_CACHE`, else ~/.cache/orchestrator); the key hashes the source paths and
    the tokenizer."""
    from orchestrator.data.corpus import cache_dir

    if job.data.cache_dir is not None:
        return Path(job.data.cache_dir)
    key = hashlib.sha256(json.dumps([[str(p) for p in sources], tokenizer]).encode())
    return cache_dir() / "data" / f"{sources[0].stem}-{key.hexdigest()[:12]}"


def is_current(out: Path, sources: list[Path], tokenizer: dict[str, Any]) -> bool:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (manifest.get("tokenizer") == tokenizer and
            [{k: s[k] for k in ("path", "size", "mtime_ns")} for s in manifest["sources"]]
            == [_source_info(p) for p in sources])


def prepare(sources: list[Path], out: Path, kind: str, tokenizer_file: Path | None,
            text_field: str = "text", num_proc: int | None = None,
            progress: bool = True) -> tuple[Path, bool]:
    """Tokenize `sources` into `out` unless it is current; returns (out, whether it was built).
    `kind`: "byte" or "bpe" (then `tokenizer_file` is its tokenizer.json)."""
    sources = [p.absolute() for p in sources]
    tokenizer = tokenizer_key(kind, tokenizer_file)
    if is_current(out, sources, tokenizer):
        return out, False
    from orchestrator.data.tokenizer import BPETokenizer, ByteTokenizer

    vocab = (BPETokenizer(tokenizer_file) if kind == "bpe" else ByteTokenizer()).vocab_size
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    total = sum(p.stat().st_size for p in sources)
    started, tokens, ends = time.perf_counter(), 0, []
    workers = max(1, num_proc or os.cpu_count() or 1)
    try:
        with open(tmp / TOKENS, "wb") as f, get_context("spawn").Pool(
                workers, _start_worker, (kind, str(tokenizer_file) if tokenizer_file else None)
        ) as pool:
            for i, encoded in enumerate(pool.imap(_encode, _batches(sources, text_field))):
                for ids in encoded:
                    f.write(np.asarray(ids, dtype=dtype).tobytes())
                    tokens += len(ids)
                    ends.append(tokens)
                if progress and i % 64 == 0:
                    _report(tokens, len(ends), started, total)
        np.asarray(ends, dtype=np.int64).tofile(tmp / INDEX)
        manifest = {"sources": [{**_source_info(p), "sha256": file_sha256(p)} for p in sources],
                    "tokenizer": tokenizer, "dtype": np.dtype(dtype).name, "vocab_size": vocab,
                    "num_tokens": tokens, "num_docs": len(ends), "text_field": text_field}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"prepared {tokens} tokens of {len(ends)} documents into {out} in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return out, True


def _report(tokens: int, docs: int, started: float, total_bytes: int) -> None:
    elapsed = time.perf_counter() - started
    print(f"prepare: {docs} documents, {tokens} tokens, {tokens / max(elapsed, 1e-9):,.0f} "
          f"tokens/s ({total_bytes / 2**20:.1f} MiB of sources)", file=sys.stderr, flush=True)


def _job_inputs(job: JobConfig) -> tuple[list[Path], Path | None, dict[str, Any]]:
    """(sources, BPE tokenizer file or None, tokenizer key) of a `data=text` job."""
    from orchestrator.data import tokenizer_file, uses_bpe
    from orchestrator.data.corpus import build_corpus
    from orchestrator.errors import ConfigError

    if job.data.name != "text":
        raise ConfigError("data.name", job.data.name, "'text' (action=prepare tokenizes text "
                          "files; the other sets are built in memory)")
    bpe = tokenizer_file(job) if uses_bpe(job) else None
    if bpe is not None and not bpe.is_file():
        raise ConfigError("data.tokenizer_path", job.data.tokenizer_path,
                          "an existing tokenizer.json for data.tokenizer=bpe with action=prepare")
    sources = [(Path(job.data.path) if job.data.path else build_corpus()).absolute()]
    return sources, bpe, tokenizer_key("bpe" if bpe else "byte", bpe)


def prepare_job(job: JobConfig) -> tuple[Path, bool]:
    """`action=prepare`, and every launch of a `data=text` job before its ranks start: the
    text source (`data.path`, else the built-in corpus) with the job's tokenizer (bytes, or
    BPE from its tokenizer.json) into its cache directory, unless that is current. One launch
    at a time builds a cache directory (a lock beside it); the others wait and find it done."""
    import fcntl

    sources, bpe, tokenizer = _job_inputs(job)
    out = prepared_dir(job, sources, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(f".{out.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return prepare(sources, out, tokenizer["kind"], bpe, job.data.text_field,
                       job.data.num_proc, job.logging.progress)


def prepared(job: JobConfig) -> Path:
    """In a rank: the job's prepared corpus, which its launch made current before the ranks
    started (ranks never tokenize: eight ranks per node would do it eight times)."""
    sources, _, tokenizer = _job_inputs(job)
    out = prepared_dir(job, sources, tokenizer)
    if not is_current(out, sources, tokenizer):
        raise ValueError(f"the corpus {sources[0]} is not prepared in {out} for this tokenizer "
                         "(or changed since): launch through python -m orchestrator, or run "
                         "action=prepare with the same data settings first")
    return out
