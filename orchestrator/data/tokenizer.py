"""Tokenizers that work offline: a byte-level tokenizer (no vocabulary file at all), a
byte-level BPE trained with Hugging Face `tokenizers` on the run's own corpus, saved as
`tokenizer.json` in the run directory (and beside the saved model), and any local Hugging Face
tokenizer directory (`AutoTokenizer`), e.g. a pretrained model's."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"  # marks a directory AutoTokenizer reads
EOS = "<|endoftext|>"


class Tokenizer(Protocol):
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str]) -> Sequence[Sequence[int]]: ...
    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Token ids 0..255 are bytes; 256 is beginning-of-text, 257 end-of-text."""

    bos_id = 256
    eos_id = 257
    vocab_size = 258

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids, self.eos_id] if add_special else ids

    def encode_batch(self, texts: list[str]) -> list[bytes]:
        return [t.encode("utf-8") for t in texts]  # bytes are their own ids

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

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i < self.vocab_size])

    @staticmethod
    def train(corpus: str | Path | Iterable[str], vocab_size: int,
              out: str | Path) -> BPETokenizer:
        """Train on a text file (or an iterator of documents) and save `tokenizer.json` to
        `out` (written atomically)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        if isinstance(corpus, (str, Path)):
            tok.train([str(corpus)], trainer)
        else:
            tok.train_from_iterator(corpus, trainer)
        out = Path(out)
        tmp = out.with_suffix(".tmp")
        tok.save(str(tmp))
        tmp.replace(out)
        return BPETokenizer(out)


class HFTokenizer:
    """A local Hugging Face tokenizer directory, as `AutoTokenizer.from_pretrained` reads it;
    documents end with its `eos_token`. `vocab_size` counts added tokens too (`len`)."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.tok.model_max_length = sys.maxsize  # documents are packed, never truncated
        if self.tok.eos_token_id is None:
            raise ValueError(f"the tokenizer in {path} has no eos_token to end documents with")
        self.eos_id = self.tok.eos_token_id
        self.vocab_size = len(self.tok)
        self.path = Path(path)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i < self.vocab_size])


def hf_dir(path: str | Path) -> Path | None:
    """The directory `AutoTokenizer` should read for `path` (a directory, or a tokenizer.json
    beside a tokenizer_config.json), else None: a bare tokenizer.json is a `BPETokenizer`."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return folder if (folder / TOKENIZER_CONFIG).is_file() or path.is_dir() else None


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """Bytes (no path), a Hugging Face tokenizer directory, or a bare tokenizer.json."""
    if path is None:
        return ByteTokenizer()
    folder = hf_dir(path)
    return HFTokenizer(folder) if folder is not None else BPETokenizer(path)
