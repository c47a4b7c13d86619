"""Lifecycle: pre-train saves a Hugging Face model; the next step starts from it
(`model.pretrained_path`); generation from it is seeded and reproducible."""

from __future__ import annotations

import json
import math

import pytest
import torch

from orchestrator.data.tokenizer import BPETokenizer
from orchestrator.models.build import build_model
from tests.conftest import make_job, run_ok
from tests.distributed.checks import losses


def test_pretrain_finetune_evaluate_generate(tmp_path) -> None:
    run_ok(["+recipe=causal_lm", "parallelism=zero3", "logging=none"], tmp_path / "pre")
    model_dir = tmp_path / "pre" / "model"
    assert (model_dir / "config.json").exists() and (model_dir / "model.safetensors").exists()
    assert not list((tmp_path / "pre").glob(".model.tmp*"))  # the save was atomic

    # The saved weights are the trained ones: continuing starts near the final loss.
    run_ok(["+recipe=causal_lm", "parallelism=ddp", f"model.pretrained_path={model_dir}",
                    "train.steps=3", "optim.warmup_steps=1", "logging=none",
                    "train.save_model=false"], tmp_path / "cont")
    assert losses(tmp_path / "cont")[0] < losses(tmp_path / "pre")[0] - 1.0

    # Fine-tune on prompt/response pairs (prompt masked), then evaluate both models.
    run_ok(["+recipe=finetune", f"model.pretrained_path={model_dir}", "logging=none"],
                 tmp_path / "ft")
    got = losses(tmp_path / "ft")
    assert sum(got[-5:]) / 5 < sum(got[:5]) / 5
    # Align the fine-tuned model with DPO (the README's chain); generate from the result.
    run_ok(["+recipe=dpo", f"model.pretrained_path={tmp_path / 'ft' / 'model'}",
                   "logging=none", "train.steps=10"], tmp_path / "dpo")
    assert losses(tmp_path / "dpo")[0] == pytest.approx(math.log(2), abs=1e-5)
    model_dir = tmp_path / "dpo" / "model"
    run_ok(["+recipe=evaluate", f"model.pretrained_path={tmp_path / 'pre' / 'model'}"],
                 tmp_path / "eval")
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["objective"] == "causal" and result["tokens"] > 0
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["loss"] < losses(tmp_path / "pre")[0]  # better than the untrained model

    texts = []  # 3 prompts dealt over 2 ZeRO-3 ranks, then one process: the same text
    for name, extra in (("gen1", []), ("gen2", ["parallelism=ddp", "cluster.gpus_per_node=1"])):
        run_ok(["+recipe=generate", f"model.pretrained_path={model_dir}",
                       "generate.prompts=[The,A function,Return]", "generate.max_new_tokens=24",
                       *extra], tmp_path / name)
        rows = [json.loads(x) for x in (tmp_path / name / "generations.jsonl").open()]
        assert [r["prompt"] for r in rows] == ["The", "A function", "Return"]
        texts.append([r["completion"] for r in rows])
    assert texts[0] == texts[1] and any(texts[0])  # (a completion may be just end-of-text)


def test_finetune_from_a_save_pretrained_directory(tmp_path) -> None:
    """A model saved with transformers' own save_pretrained is a valid starting point. Under
    ZeRO-3 only rank 0 reads it; rank 1 builds on the meta device and receives its shards and
    Llama's rotary frequencies (non-persistent buffers, in no state dict), so two ranks must
    match one process that read the model itself (same samples per step: micro batch 8)."""
    job = make_job(["model=llama_tiny"])
    model = build_model(job.model, seed=11)
    model.save_pretrained(tmp_path / "hf")
    loaded = build_model(make_job(["model=llama_tiny",
                                   f"model.pretrained_path={tmp_path / 'hf'}"]).model, seed=0)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    for name, extra in [("ft", []), ("one", ["cluster.gpus_per_node=1",
                                              "train.micro_batch_size=8"])]:
        run_ok(["+recipe=fsdp_zero3", "model=llama_tiny", "train.save_model=false",
                        f"model.pretrained_path={tmp_path / 'hf'}", "logging=none", *extra],
                       tmp_path / name)
    got = losses(tmp_path / "ft")
    assert got[-1] < got[0] - 0.1
    assert max(abs(a - b) for a, b in zip(got, losses(tmp_path / "one"), strict=True)) <= 1e-5


def test_bpe_tokenizer_is_trained_at_launch_and_travels_with_the_model(tmp_path) -> None:
    run_ok(["+recipe=causal_lm", "data.tokenizer=bpe", "parallelism=ddp",
                   "logging=none"], tmp_path / "pre")
    assert (tmp_path / "pre" / "tokenizer.json").exists()
    assert (tmp_path / "pre" / "model" / "tokenizer.json").exists()
    got = losses(tmp_path / "pre")
    assert got[-1] < got[0] - 0.5
    run_ok(["+recipe=generate", f"model.pretrained_path={tmp_path / 'pre' / 'model'}",
                   "generate.prompts=[The]", "generate.temperature=0"], tmp_path / "gen")
    (row,) = [json.loads(x) for x in (tmp_path / "gen" / "generations.jsonl").open()]
    bpe = BPETokenizer(tmp_path / "pre" / "model" / "tokenizer.json")
    assert row["completion"] == bpe.decode(row["token_ids"])  # decoded with the model's BPE
