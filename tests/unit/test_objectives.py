"""Objectives: causal labels, MLM masking statistics and layout, span corruption round trip."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.data import objectives
from orchestrator.data.objectives import IGNORE


def test_causal_labels_are_the_inputs_for_the_model_to_shift() -> None:
    ids = torch.arange(12).view(2, 6)
    out = objectives.causal(ids)
    assert torch.equal(out["labels"], ids) and out["labels"] is not ids


def test_mlm_selects_15_percent_and_splits_80_10_10() -> None:
    vocab = 1000
    ids = torch.randint(0, vocab - 1, (256, 128), generator=torch.Generator().manual_seed(0))
    out = objectives.mlm(ids, vocab, torch.Generator().manual_seed(1))
    selected = out["labels"] != IGNORE
    assert abs(selected.float().mean().item() - 0.15) < 0.005
    assert torch.equal(out["labels"][selected], ids[selected])  # loss on originals only
    assert torch.equal(out["input_ids"][~selected], ids[~selected])  # others untouched
    sel_in, sel_orig = out["input_ids"][selected], ids[selected]
    masked = (sel_in == vocab - 1).float().mean().item()
    kept = (sel_in == sel_orig).float().mean().item()
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01  # (+ ~0.1 random tokens)
    assert (out["input_ids"] < vocab).all()


def test_span_corruption_round_trips_and_has_fixed_lengths() -> None:
    vocab, length = 512, 64
    ids = torch.randint(0, 400, (8, length), generator=torch.Generator().manual_seed(0))
    out = objectives.span_corruption(ids, vocab, torch.Generator().manual_seed(2))
    noise, spans = objectives.span_lengths(length, 0.15, 3.0)
    assert (noise, spans) == (10, 3)
    assert out["input_ids"].shape == (8, length - noise + spans + 1)
    assert out["labels"].shape == (8, noise + spans + 1)
    for row, inp, tgt in zip(ids.tolist(), out["input_ids"].tolist(), out["labels"].tolist(),
                             strict=True):
        assert objectives.reconstruct(inp, tgt, vocab, spans) == row
        sentinels = [t for t in tgt if t >= vocab - spans]
        assert sentinels == [vocab - 1, vocab - 2, vocab - 3]  # counted down, T5-style
        assert inp[-1] == tgt[-1] == vocab - 1 - spans  # end-of-text below the sentinels


def test_objectives_are_seeded() -> None:
    ids = torch.randint(0, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    a = objectives.mlm(ids, 512, torch.Generator().manual_seed(5))
    b = objectives.mlm(ids, 512, torch.Generator().manual_seed(5))
    assert torch.equal(a["input_ids"], b["input_ids"])


def test_sft_masks_the_prompt_and_padding_out_of_the_loss(tmp_path) -> None:
    import json

    from orchestrator.data.datasets import PromptResponse
    from orchestrator.data.tokenizer import ByteTokenizer

    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "Q: hi\n", "response": "A: yo"}) + "\n")
    row = PromptResponse(str(path), seq_len=16)[0]
    tok = ByteTokenizer()
    n_prompt, response = len(tok.encode("Q: hi\n")), [*tok.encode("A: yo"), tok.eos_id]
    labels, ids = row["labels"].tolist(), row["input_ids"].tolist()
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:n_prompt + len(response)] == response
    assert labels[n_prompt + len(response):] == [IGNORE] * (16 - n_prompt - len(response))
    assert ids[:n_prompt + len(response)] == tok.encode("Q: hi\n") + response


def test_preference_pairs_label_both_answers_after_the_same_prompt(tmp_path) -> None:
    import json

    from orchestrator.data.datasets import PreferencePairs
    from orchestrator.data.tokenizer import ByteTokenizer

    path = tmp_path / "pref.jsonl"
    path.write_text(json.dumps({"prompt": "Q?", "chosen": "yes", "rejected": "no"}) + "\n")
    row = PreferencePairs(str(path), seq_len=12)[0]
    tok = ByteTokenizer()
    for side, answer in (("chosen", "yes"), ("rejected", "no")):
        ids, labels = row[f"{side}_input_ids"].tolist(), row[f"{side}_labels"].tolist()
        assert ids[:2] == tok.encode("Q?") and labels[:2] == [IGNORE, IGNORE]
        n = len(answer) + 1  # the answer and its end-of-text carry labels, nothing else
        assert labels[2:2 + n] == [*tok.encode(answer), tok.eos_id]
        assert set(labels[2 + n:]) == {IGNORE}


def test_dpo_loss_is_the_papers_formula() -> None:
    from torch import nn

    from orchestrator.models.build import build_model
    from orchestrator.models.preference import PreferenceModel, sequence_logprobs
    from tests.conftest import make_job

    model = PreferenceModel(build_model(make_job(["model=gpt2_tiny"]).model, seed=3), 0.5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 258, (4, 16), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE  # the prompt
    batch = {"chosen_input_ids": ids[:2], "chosen_labels": labels[:2],
             "rejected_input_ids": ids[2:], "rejected_labels": labels[2:]}
    assert model(**batch).loss.item() == pytest.approx(math.log(2), abs=1e-6)  # policy == ref
    with torch.no_grad():  # move the policy away from the reference
        for p in model.policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    logits = model.policy(input_ids=ids).logits
    # log p of each scored token, by cross-entropy, summed per row
    ce = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                     labels[:, 1:].reshape(-1), reduction="none")
    assert torch.allclose(sequence_logprobs(logits, labels), -ce.view(4, -1).sum(-1), atol=1e-4)
    pol = -ce.view(4, -1).sum(-1)
    ref = sequence_logprobs(model.reference(input_ids=ids).logits, labels)
    gain = pol - ref
    want = -nn.functional.logsigmoid(0.5 * ((gain[:2]) - gain[2:])).mean()
    assert model(**batch).loss.item() == pytest.approx(want.item(), abs=1e-5)
