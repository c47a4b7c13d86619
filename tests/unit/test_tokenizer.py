"""Offline tokenizers: bytes round-trip anything; a BPE trained on the corpus compresses it."""

from __future__ import annotations

from orchestrator.data.corpus import build_corpus
from orchestrator.data.tokenizer import EOS, BPETokenizer, ByteTokenizer


def test_byte_tokenizer_round_trips_unicode() -> None:
    tok = ByteTokenizer()
    text = "naïve café — 東京"
    assert tok.decode(tok.encode(text)) == text and max(tok.encode(text)) < 256


def test_bpe_trained_on_the_corpus_round_trips_and_compresses(tmp_path) -> None:
    corpus = build_corpus(tmp_path / "corpus.txt")
    tok = BPETokenizer.train(corpus, vocab_size=1024, out=tmp_path / "tokenizer.json")
    assert tok.vocab_size == 1024 and tok.eos_id == tok.tok.token_to_id(EOS)
    text = "Return a new list containing all items from the iterable in ascending order."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(ByteTokenizer().encode(text)) / 2  # merges learned from real text
    again = BPETokenizer(tmp_path / "tokenizer.json")
    assert again.encode(text) == ids
