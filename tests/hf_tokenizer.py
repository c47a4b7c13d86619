"""A local Hugging Face tokenizer directory built in the test, with `tokenizers` and
`transformers.PreTrainedTokenizerFast` (nothing downloaded). Its end-of-text is `</s>`, not the
project's own `<|endoftext|>`, so a test sees that the tokenizer's own eos_token is used."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

EOS = "</s>"


def build_hf_tokenizer(texts: Iterable[str], out: Path, vocab_size: int = 300,
                       chat_template: str | None = None) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS,
                            chat_template=chat_template).save_pretrained(out)
    return out
