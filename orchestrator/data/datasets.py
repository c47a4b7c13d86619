"""Token datasets: seeded synthetic sequences and packed text. Both return fixed-length
`input_ids` tensors and are deterministic given the seed."""

from __future__ import annotations

import json

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
        successors = torch.stack(
            [torch.randperm(vocab_size, generator=g)[:branching] for _ in range(vocab_size)])
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


class PromptResponse(Dataset):
    """Supervised fine-tuning pairs from JSONL lines `{"prompt": ..., "response": ...}`: the
    tokens are prompt + response + end-of-text, padded to `seq_len`; only response tokens (and
    the end-of-text) carry labels, so the loss ignores the prompt and the padding."""

    def __init__(self, path: str, seq_len: int, tokenizer: Tokenizer | None = None) -> None:
        tok = tokenizer or ByteTokenizer()
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                item = json.loads(line)
                if not isinstance(item, dict) or {"prompt", "response"} - set(item):
                    raise ValueError(f"{path}:{line_no}: expected {{prompt, response}} keys")
                prompt = tok.encode(item["prompt"])
                response = [*tok.encode(item["response"]), tok.eos_id]
                ids = (prompt + response)[:seq_len]
                labels = ([IGNORE] * len(prompt) + response)[:seq_len]
                pad = seq_len - len(ids)
                self.rows.append((torch.tensor(ids + [tok.eos_id] * pad),
                                  torch.tensor(labels + [IGNORE] * pad)))
        if not self.rows:
            raise ValueError(f"{path} holds no prompt/response pairs")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels = self.rows[i]
        return {"input_ids": ids, "labels": labels}
