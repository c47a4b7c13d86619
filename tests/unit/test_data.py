"""Datasets and the rank-aware batch stream are deterministic and split across ranks."""

from __future__ import annotations

import itertools

import torch

from orchestrator.data import batches, build_dataset
from orchestrator.data.corpus import build_corpus
from orchestrator.data.datasets import MarkovTokens, PackedText
from orchestrator.data.tokenizer import ByteTokenizer
from tests.conftest import make_job


def test_markov_tokens_are_seeded_and_follow_the_chain() -> None:
    a = MarkovTokens(64, 32, vocab_size=50, branching=3, seed=7)
    b = MarkovTokens(64, 32, vocab_size=50, branching=3, seed=7)
    c = MarkovTokens(64, 32, vocab_size=50, branching=3, seed=8)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    successors: dict[int, set[int]] = {}
    for row in a.tokens.tolist():
        for x, y in itertools.pairwise(row):
            successors.setdefault(x, set()).add(y)
    assert max(len(s) for s in successors.values()) <= 3


def test_ranks_see_disjoint_samples_and_streams_repeat_with_the_seed() -> None:
    job = make_job(["train.micro_batch_size=4"])
    ds = build_dataset(job)
    r0 = [b["input_ids"] for b in itertools.islice(batches(ds, job, 0, 2), 5)]
    r1 = [b["input_ids"] for b in itertools.islice(batches(ds, job, 1, 2), 5)]
    again = [b["input_ids"] for b in itertools.islice(batches(ds, job, 0, 2), 5)]
    assert all(torch.equal(x, y) for x, y in zip(r0, again, strict=True))
    rows0 = {tuple(r) for b in r0 for r in b.tolist()}
    rows1 = {tuple(r) for b in r1 for r in b.tolist()}
    assert not rows0 & rows1


def test_resuming_the_stream_skips_exactly_the_consumed_batches() -> None:
    job = make_job()
    ds = build_dataset(job)
    full = [b["input_ids"] for b in itertools.islice(batches(ds, job, 0, 2), 8)]
    resumed = [b["input_ids"] for b in itertools.islice(batches(ds, job, 0, 2, start_step=5), 3)]
    assert all(torch.equal(x, y) for x, y in zip(full[5:], resumed, strict=True))


def test_a_resumed_mlm_stream_draws_the_same_masks_past_an_epoch_boundary() -> None:
    """BERT's masks (random per micro batch) of a stream resumed in its third epoch are those
    of the uninterrupted stream: the masks of batch k come from (seed, rank, k) alone."""
    job = make_job(["+recipe=masked_lm", "data=synthetic", "data.num_samples=24",
                    "train.micro_batch_size=4"])
    ds = build_dataset(job)
    per_epoch = 24 // 2 // 4  # samples / ranks / micro batch
    start = 2 * per_epoch + 1
    full = list(itertools.islice(batches(ds, job, 1, 2), start + 4))
    resumed = list(itertools.islice(batches(ds, job, 1, 2, start_step=start), 4))
    for want, got in zip(full[start:], resumed, strict=True):
        assert want.keys() == got.keys() and "labels" in got
        assert all(torch.equal(want[k], got[k]) for k in want)


def test_text_is_packed_losslessly(tmp_path) -> None:
    """Every token of the text, documents (split at blank lines) each followed by end-of-text,
    in order, up to the last full window; what is dropped is the tail shorter than a window.
    The expected stream is the text's own UTF-8 bytes (the byte tokenizer's ids)."""
    docs = ["héllo wörld, a small text.", "second document here."]
    path = tmp_path / "t.txt"
    path.write_text("\n\n".join(docs) + "\n\n\n", encoding="utf-8")  # a trailing blank doc
    eos = ByteTokenizer.eos_id
    stream = [i for d in docs for i in (*d.encode("utf-8"), eos)]  # 51 tokens
    ds = PackedText(str(path), seq_len=8)
    packed = ds.tokens.flatten().tolist()
    assert len(ds) == len(stream) // 8 == 6 and ds.tokens.shape == (6, 8)
    assert packed == stream[:48]
    dropped = stream[48:]
    assert dropped == [*b"e.", eos]  # the tail: "e." and its end-of-text
    assert ByteTokenizer().decode(packed) == "".join(docs)[:-2]


def test_builtin_corpus_is_real_english(tmp_path) -> None:
    path = build_corpus(tmp_path / "corpus.txt")
    text = path.read_text()
    assert len(text) > 200_000
    for word in (" the ", " function ", " returns ", " argument"):
        assert word in text
