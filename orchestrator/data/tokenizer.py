"""A byte-level tokenizer: lossless for any UTF-8 text and buildable offline (no vocab file)."""

from __future__ import annotations


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
