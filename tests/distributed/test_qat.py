"""int8 QAT through the CLI, as a user runs it: `precision.qat=int8` on 2 ranks under DDP and
FSDP2 ZeRO-3 (real torchrun launches), the int8 model each converts and saves at the end, its
report, `+recipe=evaluate` on it, and its perplexity against PTQ of a plain fp32 run on the same
data, steps and seed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch.distributed as dist

from orchestrator.common.records import read_metrics
from orchestrator.config.load import load_job
from orchestrator.data import train_and_held_out
from orchestrator.models.build import build_model
from orchestrator.quantization.int8 import MARKER, QAT_METHOD
from orchestrator.quantization.qat import ptq
from orchestrator.run.evaluation import eval_mode, held_out_sums, summarize
from orchestrator.run.quantized import inference_engine
from tests.conftest import run_ok
from tests.unit.test_quantize import EXPECTED

pytestmark = pytest.mark.slow
DATA = ["data=synthetic", "data.seq_len=32", "data.num_samples=1024", "eval.holdout=0.1",
        "train.micro_batch_size=8"]
COMMON = ["+recipe=causal_lm", "model=gpt2_tiny", "train.steps=30", "logging=none", *DATA]
RUNS = {"fp32": ["parallelism=ddp"], "ddp": ["parallelism=ddp", "precision.qat=int8"],
        "fsdp": ["precision.qat=int8"]}  # causal_lm: FSDP2 ZeRO-3
# Noise, measured first (2026-11-30, torch 2.13.0 CPU, torchao 0.18.0) with `python
# scripts/qat_table.py --steps 30 --seeds 1234 1 2 --ranks 2 --set data=synthetic
# data.seq_len=32 data.num_samples=1024 eval.holdout=0.1 train.micro_batch_size=8
# parallelism=ddp gpt2_tiny`, this test's setting: the fp32 held-out perplexity varies by
# 1.92 % (max - min over mean) between seeds; QAT int8 minus PTQ int8 (same scheme) was +0.025 %,
# +0.065 % and +0.084 %. QAT may be worse than PTQ by at most that seed-to-seed noise.
NOISE = 0.0192
# per-step |QAT loss - fp32 loss| in the same measurement: 1.2e-5 to 1.0e-3 (seed 1234)
LOSS_BOUND = 0.01


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qat")
    for name, extra in RUNS.items():
        proc = run_ok([*COMMON, *extra], root / name)
        if name != "fp32":
            assert "qat_int8: 8 linear layers 384.0 KiB -> 101.6 KiB (3.78x smaller)" \
                in proc.stdout, proc.stdout[-2000:]
    return {name: root / name for name in RUNS}


def report(run: Path) -> dict:
    return json.loads((run / "quantize.json").read_text())


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_qat_converts_reports_and_saves_the_int8_model(runs, name: str) -> None:
    r = report(runs[name])
    fp32_bytes, int8_bytes, layers = EXPECTED["gpt2"]
    assert (r["method"], r["linear_layers"]) == (QAT_METHOD, layers)
    assert (r["linear_weight_bytes_before"], r["linear_weight_bytes_after"]) == (fp32_bytes,
                                                                                  int8_bytes)
    assert r["weight_bytes_after"] < r["weight_bytes_before"]
    # the converted int8 weights are the fake-quantized ones the run trained with (to the bit,
    # tests/unit/test_qat.py): the same perplexity before and after convert
    assert r["perplexity_after"] == pytest.approx(r["perplexity_before"], rel=1e-6)
    assert r["loss_after"] < losses(runs[name])[0] - 0.3  # it trained (6.24 -> 5.58 measured)
    events = [e for e in read_metrics(runs[name] / "metrics.jsonl", events=True)
              if e.get("event") == "quantize"]
    assert len(events) == 1 and events[0]["perplexity_after"] == r["perplexity_after"]
    assert json.loads((runs[name] / "model" / MARKER).read_text())["method"] == QAT_METHOD
    planned = json.loads((runs[name] / "plan.json").read_text())["quantize"]
    assert planned["linear_int8_bytes"] == int8_bytes


def test_ddp_and_fsdp2_train_the_same_qat_model(runs) -> None:
    ddp, fsdp = losses(runs["ddp"]), losses(runs["fsdp"])
    assert len(ddp) == len(fsdp) == 30
    assert fsdp == pytest.approx(ddp, abs=1e-4)
    assert report(runs["fsdp"])["perplexity_after"] == pytest.approx(
        report(runs["ddp"])["perplexity_after"], rel=1e-4)


def test_training_saw_the_rounded_weights(runs) -> None:
    """Fails if prepare is off: the fp32 run on the same data, steps and seed would then give
    bit-identical losses. With it on, every forward multiplies by int8-rounded weights."""
    fp32, qat = losses(runs["fp32"]), losses(runs["ddp"])
    diffs = [abs(a - b) for a, b in zip(fp32, qat, strict=True)]
    assert diffs[0] > 0 and max(diffs) > 1e-5, diffs
    assert max(diffs) < LOSS_BOUND, diffs


def test_the_saved_int8_model_evaluates_to_the_reports_perplexity(runs, tmp_path) -> None:
    run_ok(["+recipe=evaluate", f"model.pretrained_path={runs['fsdp'] / 'model'}",
                    "cluster.gpus_per_node=1", "parallelism=ddp", "logging=none", *DATA],
                   tmp_path / "eval")
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["quantized"] == QAT_METHOD
    assert result["loss"] == report(runs["fsdp"])["loss_after"]


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_qat_int8_is_not_worse_than_ptq_int8_beyond_the_noise(runs, one_rank_group) -> None:
    job = load_job(str(runs["fp32"] / "config.yaml"))
    saved = dataclasses.replace(job.model, pretrained_path=str(runs["fp32"] / "model"))
    model = build_model(saved, seed=0).eval()
    ptq(model)  # the scheme QAT converts to, after plain fp32 training
    _, held_out = train_and_held_out(job)
    with eval_mode(model):
        ptq_ppl = summarize(held_out_sums(inference_engine(model, job, "cpu"), held_out, job,
                                          0, 1))["perplexity"]
    for name in ("ddp", "fsdp"):
        qat_ppl = report(runs[name])["perplexity_after"]
        assert qat_ppl <= ptq_ppl * (1 + NOISE), (name, qat_ppl, ptq_ppl)
