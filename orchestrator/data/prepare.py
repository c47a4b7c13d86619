"""Tokenize once (`action=prepare`): text sources → one flat memory-mapped token file, an index
of document ends and a manifest, in `data.cache_dir`.

Documents are those `PackedText` packs (a text file split at blank lines; a record's
`data.text_field` in JSONL, JSON, Parquet or a `save_to_disk` dataset: data/sources.py), each
followed by end-of-text. They are tokenized by
`data.num_proc` worker processes in order, so the token file equals a single-process
tokenization exactly. The files are written into a temporary directory and renamed into place:
a cache directory holding a manifest is complete. Re-running with unchanged sources (size and
mtime as in the manifest) and the same tokenizer does nothing; anything else rebuilds.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.config.schema import JobConfig
from orchestrator.data.cache import INDEX, MANIFEST, TOKENS, check_cache_dir, remove_stale_tmp
from orchestrator.data.sources import (
    BadRecord,
    Skipped,
    Source,
    SourceError,
    documents,
    open_binary,
    resolve,
    stat,
)

BATCH_DOCS, BATCH_CHARS = 4096, 1 << 20  # a task for a worker: this many documents at most

_tokenizer: Any = None
_dtype: np.dtype = np.dtype(np.uint16)


def _start_worker(path: str | None, dtype: str) -> None:
    global _tokenizer, _dtype
    from orchestrator.data.tokenizer import load_tokenizer

    _tokenizer, _dtype = load_tokenizer(path), np.dtype(dtype)


def _encode(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A batch of documents as (their tokens back to back, each followed by end-of-text; each
    one's length): two arrays, cheap to send back to the writing process."""
    encoded = _tokenizer.encode_batch(docs)
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), np.int64, len(encoded))
    flat = np.empty(int(lengths.sum()), dtype=_dtype)
    ends = np.cumsum(lengths)
    for ids, end in zip(encoded, ends, strict=True):
        flat[end - len(ids) - 1: end - 1] = (np.frombuffer(ids, np.uint8)
                                             if isinstance(ids, bytes) else ids)
    flat[ends - 1] = _tokenizer.eos_id
    return flat, lengths


class _Reader:
    """The documents of all files in order, in batches for the workers; counts what was read
    (characters, for the progress line) and what was skipped; refuses an empty file."""

    def __init__(self, files: list[Source], text_field: str, skip: bool) -> None:
        self.files, self.text_field = files, text_field
        self.skipped = Skipped() if skip else None
        self.chars = 0

    def __iter__(self) -> Iterator[list[str]]:
        batch: list[str] = []
        chars = 0
        for path in self.files:
            found = 0
            for doc in documents(path, self.text_field, self.skipped):
                found += 1
                self.chars += len(doc)
                batch.append(doc)
                chars += len(doc)
                if len(batch) == BATCH_DOCS or chars >= BATCH_CHARS:
                    yield batch
                    batch, chars = [], 0
            if not found:
                raise BadRecord(f"{path}:1: no documents (the source is empty, blank, or "
                                "every record was skipped)")
        if batch:
            yield batch


def file_sha256(path: Source) -> str:
    h = hashlib.sha256()
    with open_binary(path) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _files_of(sources: list[Source]) -> list[Source]:
    """The files whose size and mtime say whether `sources` changed (a `save_to_disk`
    directory's own files)."""
    return [f for p in sources for f in (sorted(x for x in p.rglob("*") if x.is_file())
                                         if isinstance(p, Path) and p.is_dir() else [p])]


def _source_info(path: Source) -> dict[str, Any]:
    size, mtime_ns = stat(path)
    return {"path": str(path), "size": size, "mtime_ns": mtime_ns}


def text_key(tokenizer: Path | None, text_field: str) -> dict[str, Any]:
    """What a text cache's tokens depend on besides the sources: the tokenizer and the field
    records are read from."""
    return {**tokenizer_key(tokenizer), "text_field": text_field}


def tokenizer_key(tokenizer: Path | None) -> dict[str, Any]:
    """What the prepared tokens depend on: bytes, or the tokenizer's files' contents."""
    if tokenizer is None:
        return {"kind": "byte", "sha256": None}
    files = _files_of([tokenizer])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{file_sha256(f)}\0".encode())
    return {"kind": "hf" if tokenizer.is_dir() else "bpe", "sha256": h.hexdigest()}


def is_current(out: Path, sources: list[Source], tokenizer: dict[str, Any],
               skipped_ok: bool = True) -> bool:
    """Whether `out` holds `sources` prepared with these settings (`tokenizer`: the key of
    everything else the contents depend on) and unchanged since; a cache that passed over bad
    records is not current for a job that must stop at them (`skipped_ok=False`)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("skipped", 0) and not skipped_ok:
        return False
    return (manifest.get("tokenizer") == tokenizer and
            [{k: s[k] for k in ("path", "size", "mtime_ns")} for s in manifest["sources"]]
            == [_source_info(p) for p in _files_of(sources)])


def prepare(sources: list[Source], out: Path, tokenizer: Path | None = None,
            text_field: str = "text", num_proc: int | None = None, progress: bool = True,
            on_error: str = "raise") -> tuple[Path, bool]:
    """Tokenize `sources` (files, or `save_to_disk` directories) into `out` unless it is
    current; returns (out, whether it was built). `tokenizer`: None for bytes, a tokenizer.json
    or a Hugging Face tokenizer directory. A bad record raises `BadRecord` (file:line), or
    under `on_error="skip"` is counted in the manifest (`skipped`)."""
    from orchestrator.data.tokenizer import load_tokenizer

    sources = [p.absolute() if isinstance(p, Path) else p for p in sources]
    key = text_key(tokenizer, text_field)
    if is_current(out, sources, key, skipped_ok=on_error == "skip"):
        return out, False
    remove_stale_tmp(out)
    vocab = load_tokenizer(tokenizer).vocab_size
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    total = sum(stat(p)[0] for p in _files_of(sources))
    reader = _Reader(sources, text_field, on_error == "skip")
    started, tokens, docs = time.perf_counter(), 0, 0
    workers = max(1, num_proc or os.cpu_count() or 1)
    try:
        with open(tmp / TOKENS, "wb") as f, open(tmp / INDEX, "wb") as index, \
                get_context("spawn").Pool(workers, _start_worker, (
                    str(tokenizer) if tokenizer else None, np.dtype(dtype).name)) as pool:
            # in order, with a bounded number of batches in flight: memory stays flat however
            # far the reading runs ahead of the tokenizing
            pending: deque[Any] = deque()
            for i, batch in enumerate(itertools.chain(reader, [None])):
                if batch is not None:
                    pending.append(pool.apply_async(_encode, (batch,)))
                while pending and (batch is None or len(pending) > 2 * workers):
                    flat, lengths = pending.popleft().get()
                    f.write(flat.tobytes())
                    (tokens + np.cumsum(lengths)).tofile(index)
                    tokens, docs = tokens + len(flat), docs + len(lengths)
                if progress and i % 16 == 0:
                    _report(tokens, docs, started, reader.chars, total)
        skipped = reader.skipped or Skipped()
        manifest = {"sources": [{**_source_info(p), "sha256": file_sha256(p)}
                                for p in _files_of(sources)],
                    "tokenizer": key, "dtype": np.dtype(dtype).name, "vocab_size": vocab,
                    "num_tokens": tokens, "num_docs": docs, "text_field": text_field,
                    "skipped": skipped.count, "first_skipped": skipped.first}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"prepared {tokens} tokens of {docs} documents into {out} in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    if skipped.count:  # always said: data.on_error=skip must not hide how much was dropped
        print(f"prepare: skipped {skipped.count} bad records of {out.name}'s sources (first: "
              f"{skipped.first})", file=sys.stderr, flush=True)
    return out, True


def _report(tokens: int, docs: int, started: float, chars: int, total_bytes: int) -> None:
    """One progress line: documents, tokens, rate, and the ETA from the share of the sources
    read so far (characters for bytes: exact for ASCII text, an estimate otherwise)."""
    elapsed = time.perf_counter() - started
    done = min(chars / max(total_bytes, 1), 0.999)
    eta = f", ETA {elapsed * (1 - done) / done:.0f} s" if done > 0.01 else ""
    print(f"prepare: {docs} documents, {tokens} tokens, {tokens / max(elapsed, 1e-9):,.0f} "
          f"tokens/s, {100 * done:.0f}% of {total_bytes / 2**20:.1f} MiB{eta}",
          file=sys.stderr, flush=True)


def job_sources(job: JobConfig) -> list[list[Source]]:
    """The files of each of a `data=text` job's sources: `data.sources`, else `data.path`,
    else the built-in corpus. A path naming nothing is refused (`DataError`)."""
    from orchestrator.common.errors import ConfigError, DataError
    from orchestrator.data.corpus import build_corpus

    if job.data.name != "text":
        raise ConfigError("data.name", job.data.name, "'text', 'jsonl_sft' or 'jsonl_pref' "
                          "(action=prepare tokenizes them; synthetic data is made in memory)")
    specs = ([s.path for s in job.data.sources] or
             [job.data.path or str(build_corpus())])
    try:
        return [resolve(spec) for spec in specs]
    except FileNotFoundError as e:
        raise DataError(f"data: {e}") from None


def _tokenizer_of(job: JobConfig) -> Path | None:
    from orchestrator.common.errors import ConfigError
    from orchestrator.data.settings import tokenizer_file, uses_bpe

    tok = tokenizer_file(job) if uses_bpe(job) else None
    if tok is not None and not tok.exists():
        raise ConfigError("data.tokenizer_path", job.data.tokenizer_path,
                          "an existing tokenizer.json or tokenizer directory for "
                          f"data.tokenizer={job.data.tokenizer} with action=prepare")
    return tok


def prepared_dirs(job: JobConfig, tokenizer: dict[str, Any]
                  ) -> list[tuple[list[Source], Path]]:
    """(files, cache directory) of each source: `data.cache_dir` (its `source-i` for several
    sources), else `<cache>/data/<first file>-<hash of the files and the tokenizer>` under
    the project's cache (`$ORCHESTRATOR_CACHE`, else ~/.cache/orchestrator)."""
    from orchestrator.common.files import cache_dir

    out = []
    every = job_sources(job)
    for i, files in enumerate(every):
        if job.data.cache_dir is not None:
            where = Path(job.data.cache_dir)
            out.append((files, where if len(every) == 1 else where / f"source-{i}"))
            continue
        key = hashlib.sha256(json.dumps([[str(p) for p in files], tokenizer,
                                         job.data.text_field]).encode())
        out.append((files, cache_dir() / "data" / f"{files[0].stem}-{key.hexdigest()[:12]}"))
    return out


def prepare_job(job: JobConfig) -> list[tuple[Path, bool]]:
    """`action=prepare`, and every launch of a `data=text` job before its ranks start: each
    source with the job's tokenizer into its cache directory, unless that is current. One
    launch at a time builds a cache directory (a lock beside it); the others wait and find it
    done. A bad record, an empty source or one shorter than a sequence is a `DataError`."""
    import fcntl

    from orchestrator.common.errors import DataError

    tok = _tokenizer_of(job)
    if job.data.cache_dir is not None:  # before anything is tokenized or written
        check_cache_dir(Path(job.data.cache_dir), several=len(job.data.sources) > 1)
    done = []
    for files, out in prepared_dirs(job, tokenizer_key(tok)):
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.with_name(f".{out.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                done.append(prepare(files, out, tok, job.data.text_field, job.data.num_proc,
                                    job.logging.progress, job.data.on_error))
            except (BadRecord, SourceError) as e:
                raise DataError(f"data: {e}") from None
        tokens = json.loads((out / MANIFEST).read_text())["num_tokens"]
        if tokens < job.data.seq_len:
            raise DataError(f"data: {files[0]}: {tokens} tokens, fewer than one sequence of "
                            f"data.seq_len={job.data.seq_len}")
    return done


def all_documents(job: JobConfig) -> Iterator[str]:
    """Every document of a `data=text` job's sources, in order (to train its BPE on); a bad
    record stops it as in `prepare` (or is passed over under data.on_error=skip)."""
    from orchestrator.common.errors import DataError

    skipped = Skipped() if job.data.on_error == "skip" else None
    try:
        for files in job_sources(job):
            for path in files:
                yield from documents(path, job.data.text_field, skipped)
    except (BadRecord, SourceError) as e:
        raise DataError(f"data: {e}") from None


def prepared(job: JobConfig) -> list[Path]:
    """In a rank: the job's prepared sources, which its launch made current before the ranks
    started (ranks never tokenize: eight ranks per node would do it eight times)."""
    tok = _tokenizer_of(job)
    key = text_key(tok, job.data.text_field)
    dirs = prepared_dirs(job, tokenizer_key(tok))  # resolves every glob (remote ones too): once
    for files, out in dirs:
        if not is_current(out, files, key, skipped_ok=job.data.on_error == "skip"):
            raise ValueError(f"the source {files[0]} is not prepared in {out} for this "
                             "tokenizer (or changed since): launch through python -m "
                             "orchestrator, or run action=prepare with the same data settings "
                             "first")
    return [out for _, out in dirs]
