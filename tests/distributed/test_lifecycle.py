"""Lifecycle: pre-train saves a Hugging Face model; the next step starts from it
(`model.pretrained_path`); generation from it is seeded and reproducible."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from orchestrator.config.schema import JobConfig
from orchestrator.data import train_and_held_out
from orchestrator.data.tokenizer import BPETokenizer
from orchestrator.models.build import build_model
from tests.conftest import make_job, run_ok
from tests.distributed.checks import losses
from tests.distributed.test_families import pretraining


def test_pretrain_finetune_evaluate_generate(tmp_path, shared_run) -> None:
    pre = shared_run(pretraining("causal_lm", "zero3"))  # test_families.py's run
    model_dir = pre / "model"
    assert (model_dir / "config.json").exists() and (model_dir / "model.safetensors").exists()
    assert not list(pre.glob(".model.tmp*"))  # the save was atomic

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
    # Evaluate the pre-trained model: the held-out loss of the saved weights is the trained
    # model's (far below the untrained first step's), and a plain cross-entropy agrees
    job = ["+recipe=evaluate", f"model.pretrained_path={pre / 'model'}"]
    run_ok(job, tmp_path / "eval")
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["objective"] == "causal" and result["tokens"] > 0
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["loss"] < losses(pre)[0] - 1.0
    assert (result["loss"], result["tokens"]) == pytest.approx(
        plain_held_out_loss(make_job(job), pre / "model"), rel=1e-5)

    texts = []  # 3 prompts dealt over 2 ZeRO-3 ranks, then one process: the same text
    for name, extra in (("gen1", []), ("gen2", ["parallelism=ddp", "cluster.gpus_per_node=1"])):
        run_ok(["+recipe=generate", f"model.pretrained_path={model_dir}",
                       "generate.prompts=[The,A function,Return]", "generate.max_new_tokens=24",
                       *extra], tmp_path / name)
        rows = [json.loads(x) for x in (tmp_path / name / "generations.jsonl").open()]
        assert [r["prompt"] for r in rows] == ["The", "A function", "Return"]
        texts.append([r["completion"] for r in rows])
    assert texts[0] == texts[1] and any(texts[0])  # (a completion may be just end-of-text)


def plain_held_out_loss(job: JobConfig, model_dir: Path) -> tuple[float, int]:
    """(mean next-token cross-entropy, tokens scored) of the transformers model at `model_dir`
    over what `+recipe=evaluate` scores: the held-out windows dealt to 2 ranks as
    DistributedSampler documents it (no shuffle, the list padded from its start to an even
    length, rank r takes every 2nd from r), at most eval.max_batches micro batches each."""
    from transformers import AutoModelForCausalLM

    _, held_out = train_and_held_out(job)
    n, world, cap = len(held_out), 2, job.eval.max_batches * job.train.micro_batch_size
    order = list(range(n)) + list(range(-n % world))
    picked = [i for r in range(world) for i in order[r::world][:cap]]
    ids = torch.stack([held_out[i]["input_ids"] for i in picked])
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    tokens = ids[:, 1:].numel()
    return loss.item() / tokens, tokens


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
