"""Tokenizers that work offline: a byte-level tokenizer (no vocabulary file at all) and a
byte-level BPE trained with Hugging Face `tokenizers` on the run's own corpus, saved as
`tokenizer.json` in the run directory (and beside the saved model)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

TOKENIZER_JSON = "tokenizer.json"
EOS = "<|endoftext|>"


class Tokenizer(Protocol):
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Token ids 0..255 are bytes; 256 is beginning-of-text, 257 end-of-text."""

    bos_id = 256
    eos_id = 257
    vocab_size = 258

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids, self.eos_id] if add_special else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenisation) from a `tokenizer.json`."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.tok = HFTokenizer.from_file(str(path))
        self.eos_id = self.tok.token_to_id(EOS)
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i < self.vocab_size])

    @staticmethod
    def train(corpus: str | Path, vocab_size: int, out: str | Path) -> BPETokenizer:
        """Train on a text file and save `tokenizer.json` to `out` (written atomically)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train([str(corpus)], trainer)
        out = Path(out)
        tmp = out.with_suffix(".tmp")
        tok.save(str(tmp))
        tmp.replace(out)
        return BPETokenizer(out)
