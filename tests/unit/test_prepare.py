"""Tokenize once (issue 13): a few-MB corpus prepared by 2 worker processes equals a plain
single-process tokenization exactly, is read back through a memory map as the same windows the
in-memory path packs, is left alone when nothing changed and rebuilt when a source did."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from orchestrator.data.corpus import build_corpus
from orchestrator.data.datasets import PackedText
from orchestrator.data.memmap import MemmapTokens
from orchestrator.data.prepare import INDEX, MANIFEST, TOKENS, prepare
from orchestrator.data.tokenizer import BPETokenizer, ByteTokenizer
from tests.conftest import run_cli, run_ok


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 3 MB: the built-in corpus three times, each copy's documents tagged so no two
    documents are equal (non-ASCII too, so UTF-8 sequences cross read boundaries)."""
    text = build_corpus().read_text(encoding="utf-8")
    docs = [d for d in text.split("\n\n") if d.strip()]
    copies = []
    while sum(map(len, copies)) < 3_000_000:
        n = len(copies)
        copies.append("\n\n".join(f"{d} — copy {n}, doc {i} ü" for i, d in enumerate(docs)))
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n\n".join(copies) + "\n", encoding="utf-8")
    return path


def plain_tokens(path: Path, encode, eos: int) -> list[int]:
    """The single-process reference: the whole file split at blank lines, each document
    encoded and followed by end-of-text."""
    out: list[int] = []
    for doc in path.read_text(encoding="utf-8").split("\n\n"):
        if doc.strip():
            out += [*encode(doc), eos]
    return out


def test_two_workers_write_exactly_the_single_process_tokens(corpus, tmp_path) -> None:
    out, built = prepare([corpus], tmp_path / "bytes", None, num_proc=2, progress=False)
    assert built
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["dtype"] == "uint16" and manifest["sources"][0]["size"] == \
        corpus.stat().st_size
    tokens = np.fromfile(out / TOKENS, dtype=np.uint16)
    tok = ByteTokenizer()
    assert tokens.tolist() == plain_tokens(corpus, tok.encode, tok.eos_id)
    ends = np.fromfile(out / INDEX, dtype=np.int64)
    assert len(ends) == manifest["num_docs"] and ends[-1] == len(tokens)
    assert (tokens[ends - 1] == tok.eos_id).all()  # every document ends with end-of-text
    # the memory-mapped windows are the ones the in-memory path packs from the same text
    mapped, packed = MemmapTokens(out, 64), PackedText(str(corpus), 64)
    assert len(mapped) == len(packed)
    for i in (0, 1, len(packed) // 2, len(packed) - 1):
        assert mapped[i]["input_ids"].tolist() == packed[i]["input_ids"].tolist()


def test_a_bpe_corpus_matches_hugging_faces_own_encoding(corpus, tmp_path) -> None:
    bpe = BPETokenizer.train(build_corpus(), 512, tmp_path / "tokenizer.json")
    out, _ = prepare([corpus], tmp_path / "bpe", tmp_path / "tokenizer.json",
                     num_proc=2, progress=False)
    tokens = np.fromfile(out / TOKENS, dtype=np.uint16).tolist()
    assert tokens == plain_tokens(corpus, lambda d: bpe.tok.encode(d).ids, bpe.eos_id)


def test_unchanged_sources_are_not_prepared_again_and_changed_ones_are(corpus, tmp_path) -> None:
    source = tmp_path / "small.txt"
    source.write_text("one document\n\nand another\n", encoding="utf-8")
    out, built = prepare([source], tmp_path / "cache", None, num_proc=2,
                         progress=False)
    stamp = (out / TOKENS).stat().st_mtime_ns
    assert built and not prepare([source], out, progress=False)[1]
    assert (out / TOKENS).stat().st_mtime_ns == stamp  # a no-op: not even rewritten
    source.write_text("one document\n\nand another, edited\n", encoding="utf-8")
    os.utime(source, ns=(stamp + 10**9, stamp + 10**9))
    assert prepare([source], out, progress=False)[1]
    assert bytes(np.fromfile(out / TOKENS, dtype=np.uint16)[-10:-1].tolist()) == b", edited\n"


def test_action_prepare_from_the_command_line(tmp_path) -> None:
    source = tmp_path / "text.txt"
    source.write_text("a first document\n\na second one\n" * 50, encoding="utf-8")
    args = ["data=text", f"data.path={source}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.num_proc=2", "action=prepare"]
    first = run_ok(args, tmp_path / "run")
    assert first.stdout.splitlines()[-1] == f"prepared: {tmp_path / 'cache'}"
    again = run_cli(args, tmp_path / "run")
    assert again.stdout.splitlines()[-1] == f"up to date, nothing to do: {tmp_path / 'cache'}"
    assert not (tmp_path / "run").exists()  # nothing written to a run dir
    wrong = run_cli(["action=prepare"], tmp_path / "run")
    assert wrong.returncode == 2
    assert wrong.stderr.splitlines() == [
        "error: config key 'data.name' has value 'synthetic'; allowed: 'text', 'jsonl_sft' or "
        "'jsonl_pref' (action=prepare tokenizes them; synthetic data is made in memory)"]


def test_a_rank_never_tokenizes_and_refuses_a_corpus_not_prepared(tmp_path) -> None:
    """Ranks only map what the launch prepared: an unprepared (or changed) corpus is refused
    with the way out, instead of every rank tokenizing it."""
    from orchestrator.data import build_dataset
    from orchestrator.data.prepare import prepare_job
    from tests.conftest import make_job

    source = tmp_path / "text.txt"
    source.write_text("a first document\n\na second one\n" * 50, encoding="utf-8")
    job = make_job(["data=text", f"data.path={source}", f"data.cache_dir={tmp_path / 'c'}",
                    "data.seq_len=16", "data.num_proc=1"])
    with pytest.raises(ValueError, match="not prepared in .*action=prepare"):
        build_dataset(job)
    prepare_job(job)
    assert len(build_dataset(job)) == len(PackedText(str(source), 16))
