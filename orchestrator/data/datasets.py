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
        with open(path, encoding="utf-8") as f:
            docs = [d for d in f.read().split("\n\n") if d.strip()]
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


def _jsonl(path: str, keys: set[str]) -> Iterator[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            item = json.loads(line)
            if not isinstance(item, dict) or keys - set(item):
                raise ValueError(f"{path}:{line_no}: expected {{{', '.join(sorted(keys))}}} keys")
            yield item


class PromptResponse(Dataset):
    """Supervised fine-tuning pairs from JSONL lines `{"prompt": ..., "response": ...}`; the
    loss ignores the prompt and the padding."""

    def __init__(self, path: str, seq_len: int, tokenizer: Tokenizer | None = None) -> None:
        tok = tokenizer or ByteTokenizer()
        self.rows = [prompt_response(tok, r["prompt"], r["response"], seq_len)
                     for r in _jsonl(path, {"prompt", "response"})]
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
        for r in _jsonl(path, {"prompt", "chosen", "rejected"}):
            chosen = prompt_response(tok, r["prompt"], r["chosen"], seq_len)
            rejected = prompt_response(tok, r["prompt"], r["rejected"], seq_len)
            self.rows.append({"chosen_input_ids": chosen[0], "chosen_labels": chosen[1],
                              "rejected_input_ids": rejected[0],
                              "rejected_labels": rejected[1]})
        if not self.rows:
            raise ValueError(f"{path} holds no preference pairs")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]
