"""Token datasets: seeded synthetic sequences, packed text, prompt/response pairs (SFT) and
preference pairs (DPO). All return fixed-length tensors and are deterministic given the seed."""

from __future__ import annotations

import json
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset

from orchestrator.data.objectives import IGNORE
from orchestrator.data.tokenizer import ByteTokenizer, Tokenizer


class MarkovTokens(Dataset):
    """Sequences from a seeded sparse Markov chain: each token has `branching` possible
    successors, so a model can learn them (loss falls towards ln(branching))."""

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, branching: int,
                 seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        # Row by row: a list of slices would keep every full permutation alive (8 * V² bytes,
        # 20 GB for GPT-2's vocabulary) until the stack.
        successors = torch.empty(vocab_size, branching, dtype=torch.long)
        for row in successors:
            row.copy_(torch.randperm(vocab_size, generator=g)[:branching])
        tokens = torch.empty(num_samples, seq_len, dtype=torch.long)
        tokens[:, 0] = torch.randint(vocab_size, (num_samples,), generator=g)
        picks = torch.randint(branching, (num_samples, seq_len), generator=g)
        for t in range(1, seq_len):
            tokens[:, t] = successors[tokens[:, t - 1], picks[:, t]]
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i]}


class PackedText(Dataset):
    """A text file tokenized and packed into back-to-back windows of `seq_len` tokens
    (documents separated by end-of-text), as in GPT-style pre-training."""

    def __init__(self, path: str, seq_len: int, tokenizer: Tokenizer | None = None) -> None:
        tok = tokenizer or ByteTokenizer()
        try:
            with open(path, encoding="utf-8") as f:
                docs = [d for d in f.read().split("\n\n") if d.strip()]
        except UnicodeDecodeError as e:  # read() decodes the whole file at once
            raise ValueError(f"{path}: not UTF-8 at byte {e.start} ({e.reason})") from None
        ids: list[int] = []
        for doc in docs:
            ids.extend(tok.encode(doc))
            ids.append(tok.eos_id)
        n = len(ids) // seq_len
        if n == 0:
            raise ValueError(f"{path} has {len(ids)} tokens, fewer than one sequence ({seq_len})")
        self.tokens = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i]}


def prompt_response(tok: Tokenizer, prompt: str, response: str, seq_len: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels): prompt + response + end-of-text, padded to `seq_len`; only the
    response and its end-of-text carry labels."""
    p = tok.encode(prompt)
    r = [*tok.encode(response), tok.eos_id]
    ids = (p + r)[:seq_len]
    labels = ([IGNORE] * len(p) + r)[:seq_len]
    pad = seq_len - len(ids)
    return torch.tensor(ids + [tok.eos_id] * pad), torch.tensor(labels + [IGNORE] * pad)


def trainable_tokens(labels: torch.Tensor) -> int:
    """Labelled positions a causal LM learns from: it predicts position t from the positions
    before it, so a label at position 0 is never predicted (the loss shifts labels by one)."""
    return int((labels[1:] != IGNORE).sum())


def labelled_pair(tok: Tokenizer, prompt: str, answer: str, seq_len: int,
                  key: str = "response") -> tuple[torch.Tensor, torch.Tensor]:
    """`prompt_response`, refusing a row with no trainable token (its loss would be 0/0 = NaN):
    ValueError says why."""
    ids, labels = prompt_response(tok, prompt, answer, seq_len)
    if trainable_tokens(labels) == 0:
        n = len(tok.encode(prompt))
        if n >= seq_len:
            why = f"the prompt's {n} tokens fill data.seq_len={seq_len}, leaving no {key} token"
        elif n == 0 and not answer:
            why = f"prompt and {key} are both empty"
        else:
            why = f"no {key} token fits in data.seq_len={seq_len}"
        raise ValueError(f"no trainable token: {why}")
    return ids, labels


REQUIRED_KEYS = {"jsonl_sft": ("prompt", "response"),
                 "jsonl_pref": ("prompt", "chosen", "rejected")}


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def parse_row(line: str, keys: tuple[str, ...]) -> dict[str, str]:
    """One JSONL line as a row: a JSON object whose `keys` hold strings; ValueError says why
    not (without the location, which the caller knows)."""
    try:
        item = json.loads(line.rstrip("\n"))
    except json.JSONDecodeError as e:  # one line: the column is the position that matters
        raise ValueError(f"invalid JSON at column {e.pos + 1}: {e.msg}") from None
    expected = "{" + ", ".join(keys) + "}"
    if not isinstance(item, dict):
        raise ValueError(f"a JSON {_type_name(item)}, expected an object with keys {expected}")
    for key in keys:
        if key not in item:
            raise ValueError(f"missing key {key!r}, expected keys {expected}")
        if not isinstance(item[key], str):
            raise ValueError(f"key {key!r} is {_type_name(item[key])}, expected a string")
    return item


def read_jsonl(path: str, keys: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for each non-blank line; ValueError names `path:line`."""
    line_no = 0
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = parse_row(line, keys)
                except ValueError as e:
                    raise ValueError(f"{path}:{line_no}: {e}") from None
                yield line_no, row
    except UnicodeDecodeError as e:
        # text mode decodes ahead of the line being read: the bad byte is at or after it
        raise ValueError(f"{path}: not UTF-8 after line {line_no} ({e.reason})") from None


class PromptResponse(Dataset):
    """Supervised fine-tuning pairs from JSONL lines `{"prompt": ..., "response": ...}`; the
    loss ignores the prompt and the padding."""

    def __init__(self, path: str, seq_len: int, tokenizer: Tokenizer | None = None) -> None:
        tok = tokenizer or ByteTokenizer()
        self.rows = []
        for line_no, r in read_jsonl(path, REQUIRED_KEYS["jsonl_sft"]):
            try:
                self.rows.append(labelled_pair(tok, r["prompt"], r["response"], seq_len))
            except ValueError as e:
                raise ValueError(f"{path}:{line_no}: {e}") from None
        if not self.rows:
            raise ValueError(f"{path} holds no prompt/response pairs")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels = self.rows[i]
        return {"input_ids": ids, "labels": labels}


class PreferencePairs(Dataset):
    """DPO pairs from JSONL lines `{"prompt", "chosen", "rejected"}`: both answers after the
    same prompt, labelled on the answer tokens only."""

    def __init__(self, path: str, seq_len: int, tokenizer: Tokenizer | None = None) -> None:
        tok = tokenizer or ByteTokenizer()
        self.rows = []
        for line_no, r in read_jsonl(path, REQUIRED_KEYS["jsonl_pref"]):
            try:
                chosen = labelled_pair(tok, r["prompt"], r["chosen"], seq_len, "chosen")
                rejected = labelled_pair(tok, r["prompt"], r["rejected"], seq_len, "rejected")
            except ValueError as e:
                raise ValueError(f"{path}:{line_no}: {e}") from None
            self.rows.append({"chosen_input_ids": chosen[0], "chosen_labels": chosen[1],
                              "rejected_input_ids": rejected[0],
                              "rejected_labels": rejected[1]})
        if not self.rows:
            raise ValueError(f"{path} holds no preference pairs")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]
