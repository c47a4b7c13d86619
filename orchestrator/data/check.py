"""Launcher-side checks of `data.path`, before any process starts: a file the ranks would fail
on (binary, not UTF-8, malformed JSONL) or silently train nonsense on (too short for one
sequence, rows with no trainable token, whose loss is NaN) is refused as a `ConfigError`.

The file is streamed (1 MiB chunks; JSONL line by line), so a large corpus is never held in
memory; the datasets repeat the JSONL checks on the ranks as a backstop.
"""

from __future__ import annotations

import codecs
import io
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from omegaconf import MISSING

from orchestrator.common.errors import ConfigError
from orchestrator.config.schema import JobConfig
from orchestrator.data.cache import check_cache_dir
from orchestrator.data.settings import get_tokenizer, tokenizer_file, uses_bpe
from orchestrator.data.sources import RECORD_SUFFIXES, SourceError
from orchestrator.data.tokenizer import Tokenizer

CHUNK = 1 << 20
BINARY_WINDOW = 1 << 20  # NUL bytes in the first MiB mark a binary file

# (path, size, mtime, settings) of files already checked: validate() runs twice under
# parallelism=auto, and a passing file need not be read twice
_passed: set[tuple[object, ...]] = set()


def check_eval(job: JobConfig) -> None:
    """The `eval` keys' own checks (called by `validate`, after `eval.holdout`'s range)."""
    e = job.eval
    if e.max_batches <= 0:
        raise ConfigError("eval.max_batches", e.max_batches, "a number > 0")
    n = e.every_steps
    if n < 0:
        raise ConfigError("eval.every_steps", n, "a number >= 0 (0 = no evaluation during "
                          "training)")
    if n == 0:
        return
    if job.train.task != "pretrain":
        raise ConfigError("eval.every_steps", n, f"0 for train.task={job.train.task} (it "
                          "evaluates during training, train.task=pretrain)")
    if job.dpo_beta is not None:
        raise ConfigError("eval.every_steps", n, "0 for DPO (its preference pairs have no "
                          "per-token held-out loss to evaluate)")
    if e.holdout == 0 and e.path is None:
        raise ConfigError("eval.holdout", e.holdout, f"a fraction in (0, 1) with "
                          f"eval.every_steps={n} (the held-out share evaluated during "
                          "training, e.g. eval.holdout=0.1), or set eval.path")


def check_tokenizer(job: JobConfig) -> None:
    """data.tokenizer=bpe: text to train on, and a given tokenizer_path is a tokenizer.json;
    data.tokenizer=hf: tokenizer_path is a tokenizer directory or tokenizer.json."""
    d = job.data
    if d.tokenizer == "byte" and d.tokenizer_path is not None:
        raise ConfigError("data.tokenizer_path", d.tokenizer_path, "null with data.tokenizer="
                          "byte (bytes need no tokenizer file); set data.tokenizer=hf for a "
                          "Hugging Face tokenizer directory or bpe for a tokenizer.json")
    if d.tokenizer == "byte" and not d.chat_template:
        return
    if d.tokenizer != "byte" and d.name == "synthetic" and job.train.task != "generate":
        raise ConfigError("data.tokenizer", d.tokenizer,
                          "'byte' for synthetic data (it has no text)")
    if d.tokenizer == "bpe" and d.tokenizer_path and not os.path.isfile(d.tokenizer_path):
        raise ConfigError("data.tokenizer_path", d.tokenizer_path,
                          "an existing tokenizer.json, or null to train one at launch")
    if d.tokenizer == "hf" and not (d.tokenizer_path and os.path.exists(d.tokenizer_path)):
        raise ConfigError("data.tokenizer_path", d.tokenizer_path, "a local Hugging Face "
                          "tokenizer directory (or tokenizer.json) for data.tokenizer=hf")
    tok = None
    if d.tokenizer == "hf" or (d.tokenizer == "bpe" and d.tokenizer_path):
        try:
            tok = get_tokenizer(job)
        except Exception as e:  # noqa: BLE001 - `tokenizers` raises a bare Exception
            what = ("a tokenizer AutoTokenizer can load" if d.tokenizer == "hf" else
                    "a tokenizer.json the tokenizers library can load")
            raise ConfigError("data.tokenizer_path", d.tokenizer_path,
                              f"{what} ({_one_line(e)})") from None
    if d.chat_template and (d.name not in ("jsonl_sft", "jsonl_pref") or
                            getattr(getattr(tok, "tok", None), "chat_template", None) is None):
        raise ConfigError("data.chat_template", True, "false unless data.name is jsonl_sft or "
                          "jsonl_pref and data.tokenizer=hf names a tokenizer with a chat "
                          "template")


def _one_line(e: BaseException) -> str:
    """A library's (often multi-line) message as one line."""
    return " ".join(str(e).split()) or type(e).__name__


def _resolve(key: str, spec: str, where: str) -> None:
    """`spec` names something readable: files here, or a URL whose filesystem package is
    installed and which lists (one line naming the key otherwise)."""
    from orchestrator.data.sources import resolve

    try:
        resolve(spec)
    except FileNotFoundError:
        raise ConfigError(key, spec, where) from None
    except SourceError as e:
        raise ConfigError(key, spec, str(e)) from None


def check_sources(job: JobConfig) -> None:
    """Every configured source names something: `data.path` (text: a file, glob, directory
    or save_to_disk dataset) or each of `data.sources`, with positive weights."""
    d = job.data
    if d.num_workers < 0:
        raise ConfigError("data.num_workers", d.num_workers, "a number >= 0 (0 = read in the "
                          "training process)")
    if d.sources and (d.name != "text" or d.path is not None):
        raise ConfigError("data.sources", [s.path for s in d.sources],
                          "empty unless data.name='text' and data.path is null (one or "
                          "the other)")
    where = "an existing file, glob, directory or datasets save_to_disk directory"
    for i, s in enumerate(d.sources):
        if not (s.weight > 0 and math.isfinite(s.weight)):
            raise ConfigError(f"data.sources[{i}].weight", s.weight, "a finite number > 0")
        if s.path == MISSING or not s.path.strip():
            raise ConfigError(f"data.sources[{i}].path", s.path, "a path (every source names "
                              f"one: {where})")
        _resolve(f"data.sources[{i}].path", s.path, where)
    if job.eval.path is not None:
        if d.name != "text":
            raise ConfigError("eval.path", job.eval.path, "null unless data.name='text' (the "
                              "other sets evaluate on their held-out share)")
        _resolve("eval.path", job.eval.path, where)
    if d.name == "synthetic" or d.path is None:
        return
    if d.name != "text" and not os.path.isfile(d.path):
        raise ConfigError("data.path", d.path, "an existing file, or null for the built-in set")
    _resolve("data.path", d.path, where + ", or null for the built-in set")


def check_data(job: JobConfig) -> None:
    """Refuse a `data.path` the job cannot train on; synthetic data and the built-in sets
    (path null) are not checked, nor text sources other than one plain file (globs,
    directories, datasets, several sources): `action=prepare`, run by every launch, reads
    those and names the file and line of a bad record."""
    d = job.data
    if d.cache_dir is not None and d.name != "synthetic":  # before anything writes to it
        check_cache_dir(Path(d.cache_dir), several=len(d.sources) > 1)
    if d.name == "synthetic" or d.path is None or not os.path.isfile(d.path):
        return
    if d.name == "text" and Path(d.path).suffix in RECORD_SUFFIXES:
        return  # a .jsonl/.json/.parquet source: prepare reads it and names a bad record
    path = d.path
    bpe = uses_bpe(job)
    tok_file = tokenizer_file(job) if bpe else None
    tok_ready = tok_file is not None and tok_file.exists()
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns, d.name, d.seq_len, str(tok_file), tok_ready)
    if key in _passed:
        return
    if stat.st_size == 0:
        raise ConfigError("data.path", path, "a non-empty file (this one is empty)")
    tok = get_tokenizer(job) if not bpe or tok_ready else None
    if d.name != "text":
        _scan(path, trains_bpe=False)
        from orchestrator.data.datasets import REQUIRED_KEYS  # torch: only for such files

        _check_jsonl(path, REQUIRED_KEYS[d.name], d.seq_len, tok)
    else:
        # byte tokens are UTF-8 bytes; a BPE still to be trained here (byte-level, no added
        # tokens) has at most one token per byte; a tokenizer that exists is asked directly
        tokens = _scan(path, tok is None, _byte_count if tok is None else
                       (lambda doc: len(tok.encode(doc))), d.seq_len)
        if tokens < d.seq_len:
            count = (f"at most {tokens} BPE tokens" if tok is None else
                     f"{tokens} {'BPE' if bpe else 'byte'} tokens")
            raise ConfigError("data.path", path, f"a text of at least data.seq_len={d.seq_len} "
                              f"tokens, one sequence (this one has {count})")
    _passed.add(key)


def _docs(text_chunks: Iterator[str]) -> Iterator[str]:
    """The documents of a text split on blank lines, exactly as `str.split("\\n\\n")` splits
    the whole text (each piece after the last separator is carried to the next chunk)."""
    carry = ""
    for chunk in text_chunks:
        pieces = (carry + chunk).split("\n\n")
        carry = pieces.pop()
        yield from pieces
    yield carry


def _line_of(path: str, offset: int) -> int:
    """The line (from 1) holding byte `offset` of the file."""
    newlines = 0
    with open(path, "rb") as f:
        while offset > 0:
            block = f.read(min(CHUNK, offset))
            if not block:
                break
            newlines += block.count(b"\n")
            offset -= len(block)
    return newlines + 1


def _byte_count(doc: str) -> int:
    return len(doc.encode("utf-8"))


def _scan(path: str, trains_bpe: bool, doc_tokens: Callable[[str], int] | None = None,
          enough: int = 0) -> int:
    """Stream the file: refuse NUL bytes in the first MiB and any invalid UTF-8 (naming the
    byte offset). Return the tokens `PackedText` gets, `doc_tokens` + one end-of-text for each
    non-blank document (after universal-newline translation, as open() reads it), counted
    exactly until there are `enough`, then no further (0 without `doc_tokens`). `trains_bpe`:
    the BPE is to be trained on this file at launch (the message says so)."""
    tokenizer = " for data.tokenizer=bpe to train on" if trains_bpe else ""

    def chunks() -> Iterator[str]:
        utf8 = codecs.getincrementaldecoder("utf-8")()
        newlines = io.IncrementalNewlineDecoder(None, translate=True)
        offset = 0
        with open(path, "rb") as f:
            while True:
                raw = f.read(CHUNK)
                if offset < BINARY_WINDOW and b"\0" in raw[:BINARY_WINDOW - offset]:
                    at = offset + raw.index(b"\0")
                    raise ConfigError("data.path", path, f"a UTF-8 text file{tokenizer} (NUL "
                                      f"byte at offset {at}: this looks like a binary file)")
                pending = len(utf8.getstate()[0])  # bytes of a char cut at the last chunk end
                try:
                    text = utf8.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    at = offset - pending + e.start
                    raise ConfigError("data.path", path, f"a UTF-8 text file{tokenizer} (line "
                                      f"{_line_of(path, at)}, byte {at} is not UTF-8: "
                                      f"{e.reason})") from None
                yield newlines.decode(text, final=not raw)
                if not raw:
                    return
                offset += len(raw)

    tokens = 0
    for doc in _docs(chunks()):  # the whole file is decoded, however early `enough` is met
        if doc_tokens is not None and tokens < enough and doc.strip():
            tokens += doc_tokens(doc) + 1
    return tokens


def _check_jsonl(path: str, keys: tuple[str, ...], seq_len: int, tok: Tokenizer | None) -> None:
    """Every line parses to an object whose `keys` are strings, at least one row, and every
    answer has a trainable token: exactly with `tok`; without it (a BPE not trained yet) only
    a row whose prompt and answer are both empty is known to have none."""
    from orchestrator.data.datasets import labelled_pair, read_jsonl

    allowed = "JSONL with one {" + ", ".join(keys) + "} object per line"
    rows = 0
    try:
        for line_no, row in read_jsonl(path, keys):
            rows += 1
            for answer in keys[1:]:
                try:
                    if tok is not None:
                        labelled_pair(tok, row["prompt"], row[answer], seq_len, answer)
                    elif not row["prompt"] and not row[answer]:
                        raise ValueError(f"no trainable token: prompt and {answer} are both "
                                         "empty")
                except ValueError as e:
                    raise ValueError(f"{path}:{line_no}: {e}") from None
    except ValueError as e:
        raise ConfigError("data.path", path, f"{allowed} ({e})") from None
    if not rows:
        raise ConfigError("data.path", path, f"{allowed} (this one has only blank lines)")

