"""int8 post-training quantization (orchestrator/quantization/) in-process:
real torchao int8 tensors on a GPT-2 (Conv1D layers, head tied to the embedding) and a Llama
(nn.Linear, untied head), both trained here for 100 steps; bytes, held-out perplexity, the
saved format, the planner's count and the config checks. The CLI runs are in
tests/distributed/test_quantize.py."""

from __future__ import annotations

import copy
import functools
import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from orchestrator.common.errors import ConfigError
from orchestrator.config.derived import Hardware
from orchestrator.data import batches, train_and_held_out
from orchestrator.models.build import build_model
from orchestrator.planning.plan import make_plan
from orchestrator.planning.preflight import validate
from orchestrator.planning.table import plan_rows
from orchestrator.quantization.int8 import MARKER, WEIGHTS
from orchestrator.quantization.ptq import (
    conv1d_to_linear,
    is_quantized,
    linear_weight_bytes,
    quantize_model,
    save_quantized,
    weight_bytes,
)
from orchestrator.run.checkpoint.final import TOKENIZER_FILE
from orchestrator.run.distributed import RankInfo
from orchestrator.run.evaluation import eval_mode, held_out_sums, summarize
from orchestrator.run.quantized import inference_engine, run_inference
from orchestrator.run.setup import build_for_rank
from tests.conftest import free_port, make_job

MODELS = {"gpt2": "gpt2_tiny", "llama": "llama_tiny"}
METHODS = ["int8_weight_only", "int8_dynamic"]
# the synthetic Markov data (4 successors per token): 1024 samples of 32 tokens, 10 % held out
DATA = ["data.seq_len=32", "data.num_samples=1024", "eval.holdout=0.1",
        "train.micro_batch_size=8"]
# Linear-weight bytes (fp32, int8, layers), worked out by hand from configs/model/*.yaml:
# int8 = one byte per weight + per output row an fp32 scale and an int8 zero point (5 bytes).
# gpt2_tiny, d=64, d_ff=256, 2 layers; c_attn 64x192, attn c_proj 64x64, c_fc 64x256, mlp c_proj
# 256x64 = 49,152 weights and 576 output rows a layer; the head is the tied embedding (fp32).
# llama_tiny, d=64, 4 heads of 16, 2 kv heads, d_ff=172, 2 layers: q 64x64, k 32x64, v 32x64,
# o 64x64, gate/up 172x64, down 64x172 = 45,312 weights and 600 rows a layer; + the untied
# head 512x64 (512 rows).
EXPECTED = {
    "gpt2": (2 * 49_152 * 4, 2 * 49_152 + 2 * 576 * 5, 8),
    "llama": ((2 * 45_312 + 32_768) * 4, 2 * 45_312 + 32_768 + (2 * 600 + 512) * 5, 15),
}
# Held-out perplexity, quantized / fp32 - 1, measured first (2026-11-30, torch 2.13.0 CPU,
# torchao 0.18.0): gpt2 +0.015 % (weight-only), +0.040 % (dynamic); llama +0.027 %, +0.037 %.
# The bound leaves 25x room either way; a broken quantization (wrong axis, lost scale) moves
# perplexity by orders of magnitude, and an unchanged one is not quantized at all.
PERPLEXITY_BOUND = 0.01


def train_tiny(name: str, out: Path, steps: int = 100) -> Path:
    """Model `name` trained `steps` AdamW steps on DATA, saved as a run saves its model."""
    job = make_job([f"model={name}", *DATA])
    model = build_model(job.model, seed=job.train.seed)
    train_set, _ = train_and_held_out(job)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for batch in itertools.islice(batches(train_set, job, 0, 1), steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    (out / TOKENIZER_FILE).write_text(json.dumps({"type": "byte", "vocab_size": 258}) + "\n")
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ptq")
    return {family: train_tiny(name, root / family) for family, name in MODELS.items()}


@pytest.fixture(scope="module")
def quantized_dir(trained, tmp_path_factory) -> Path:
    model = build_model(make_job([f"model.pretrained_path={trained['gpt2']}"]).model, seed=0)
    quantize_model(model, "int8_weight_only")
    return save_quantized(model, tmp_path_factory.mktemp("q") / "model", "int8_weight_only",
                          str(trained["gpt2"]))


def load(path: Path) -> nn.Module:
    """The model at `path` as every recipe loads `model.pretrained_path` (one rank)."""
    return build_for_rank(make_job([f"model.pretrained_path={path}"]),
                          RankInfo(0, 1, 0, "cpu")).eval()


def held_out_perplexity(model: nn.Module, family: str) -> float:
    job = make_job([f"model={MODELS[family]}", *DATA])
    _, held_out = train_and_held_out(job)
    engine = inference_engine(model, job, "cpu")
    with eval_mode(model):
        return summarize(held_out_sums(engine, held_out, job, 0, 1))["perplexity"]


@functools.cache
def fp32_perplexity(path: Path, family: str) -> float:
    return held_out_perplexity(load(path), family)


def test_conv1d_swap_keeps_gpt2_logits_bit_identical(trained) -> None:
    model = load(trained["gpt2"])
    ids = torch.arange(40).reshape(2, 20)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert conv1d_to_linear(model) == 8
        assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", sorted(MODELS))
def test_int8_is_3x_smaller_and_perplexity_within_bound(trained, one_rank_group, family: str,
                                                        method: str) -> None:
    fp32 = load(trained[family])
    model = copy.deepcopy(fp32)
    fp32_bytes, int8_bytes, layers = EXPECTED[family]
    assert linear_weight_bytes(model) == (fp32_bytes, layers)
    assert quantize_model(model, method) == layers
    quantized = [m for m in model.modules() if isinstance(m, nn.Linear) and is_quantized(m.weight)]
    assert len(quantized) == layers  # measured from the tensors torchao made
    assert linear_weight_bytes(model) == (int8_bytes, layers)
    assert fp32_bytes / int8_bytes >= 3
    if family == "gpt2":  # the tied head stays the fp32 embedding, still tied
        assert model.lm_head.weight is model.transformer.wte.weight
        assert not is_quantized(model.lm_head.weight)

    before, after = fp32_perplexity(trained[family], family), held_out_perplexity(model, family)
    assert before < 0.1 * 512  # trained: an untrained model is near the vocabulary, 512
    assert after != before
    assert abs(after / before - 1) <= PERPLEXITY_BOUND, (before, after)


def test_the_plan_counts_the_bytes_torchao_stores(trained) -> None:
    for family, path in trained.items():
        job = make_job(["+recipe=quantize", f"model.pretrained_path={path}", "action=plan"])
        validate(job, Hardware())
        planned = make_plan(job, "cpu", 2).quantize
        model = load(path)
        fp32_weights = weight_bytes(model)
        quantize_model(model, "int8_weight_only")
        assert planned is not None and planned["method"] == "int8_weight_only"
        assert (planned["linear_fp32_bytes"], planned["linear_int8_bytes"],
                planned["linear_layers"]) == EXPECTED[family]
        assert (planned["weight_fp32_bytes"], planned["weight_int8_bytes"]) == (
            fp32_weights, weight_bytes(model))  # measured, every parameter


def test_the_plan_table_shows_gpt2_small_quantized() -> None:
    job = make_job(["+recipe=evaluate", "model=gpt2", "quantize.method=int8_dynamic",
                    "cluster.gpus_per_node=1", "parallelism=ddp", "action=plan"])
    validate(job, Hardware())
    plan = make_plan(job, "cpu", 2)
    # GPT-2 small, by hand: 12 layers of c_attn 768x2304, c_proj 768x768, c_fc 768x3072 and
    # mlp c_proj 3072x768 = 7,077,888 weights and 6,912 output rows a layer
    assert plan.quantize is not None
    assert plan.quantize["linear_fp32_bytes"] == 12 * 7_077_888 * 4 == 339_738_624
    assert plan.quantize["linear_int8_bytes"] == 12 * (7_077_888 + 6_912 * 5) == 85_349_376
    rows = dict(plan_rows(plan))
    assert rows["int8_dynamic: linear weights"] == (
        "324.0 MiB fp32 -> 81.4 MiB int8 (3.98x smaller; 48 layers, an fp32 scale + int8 zero "
        "point per output row)")
    assert make_plan(make_job(["+recipe=evaluate", "action=plan"]), "cpu", 2).quantize is None


@pytest.mark.parametrize("family", sorted(MODELS))
def test_a_saved_quantized_model_loads_back_identically(trained, tmp_path, family: str) -> None:
    model = load(trained[family])
    quantize_model(model, "int8_dynamic")
    out = save_quantized(model, tmp_path / "q", "int8_dynamic", str(trained[family]))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "generation_config.json", MARKER, WEIGHTS, TOKENIZER_FILE])
    marker = json.loads((out / MARKER).read_text())
    assert marker["method"] == "int8_dynamic" and marker["torchao"] == "0.18.0"
    loaded = load(out)  # through run.setup.build_for_rank, as every recipe loads it
    ids = torch.arange(48).reshape(2, 24) % 258
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert linear_weight_bytes(loaded) == linear_weight_bytes(model)
    assert weight_bytes(loaded) == weight_bytes(model)
    if family == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_evaluate_quantizes_the_loaded_model_on_the_fly(trained, tmp_path, monkeypatch) -> None:
    """recipes/evaluate.py's body under run.quantized.run_inference, in this process."""
    from recipes.evaluate import evaluate

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                       "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)  # as torchrun sets them; restored afterwards
    # a rank asks for SIGKILL when its parent dies: not this test process (pytest's worker)
    monkeypatch.setattr("orchestrator.common.lifeline.tie_rank_to_parent", lambda: None)
    job = make_job(["+recipe=evaluate", f"model.pretrained_path={trained['llama']}",
                    "quantize.method=int8_dynamic", "cluster.gpus_per_node=1",
                    "parallelism=ddp", "logging=none", "data=synthetic", *DATA],
                   run_dir=str(tmp_path))
    validate(job, Hardware())
    seen = []

    def body(engine, info) -> None:
        seen.extend(is_quantized(m.weight) for m in engine.model.modules()
                    if isinstance(m, nn.Linear))
        evaluate(job, engine, info)

    run_inference(job, body)
    assert seen == [True] * EXPECTED["llama"][2]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["quantized"] == "int8_dynamic"
    assert result["perplexity"] < 0.1 * 512


def _line(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        validate(make_job(overrides), Hardware())
    return f"error: {err.value}"  # what the CLI prints, exit code 2


def test_bad_quantize_configs_are_one_line(trained, quantized_dir, tmp_path) -> None:
    q, base = quantized_dir, trained["gpt2"]
    one = ["cluster.gpus_per_node=1", "parallelism=ddp"]
    why = ("for a quantized model (it runs on one process, unwrapped: int8 weights are not "
           "sharded); set cluster.gpus_per_node=1 parallelism=ddp")
    cases = [
        (["+recipe=quantize", f"model.pretrained_path={base}", "quantize.method=int4"],
         "error: config key 'quantize.method' has value 'int4'; allowed: one of 'none', "
         "'int8_weight_only', 'int8_dynamic'"),
        (["+recipe=quantize"],
         "error: config key 'model.pretrained_path' has value None; allowed: a trained model "
         "directory for train.task=quantize, e.g. an earlier run's <run_dir>/model (PTQ "
         "quantizes a trained model)"),
        (["+recipe=quantize", f"model.pretrained_path={tmp_path}"],
         f"error: config key 'model.pretrained_path' has value '{tmp_path}'; allowed: a local "
         "Hugging Face model directory (with config.json), e.g. an earlier run's "
         "<run_dir>/model"),
        (["+recipe=quantize", f"model.pretrained_path={q}"],
         f"error: config key 'model.pretrained_path' has value '{q}'; allowed: a "
         "full-precision model for train.task=quantize (this one is quantized already: "
         "int8_weight_only)"),
        (["+recipe=quantize", f"model.pretrained_path={base}", "precision=bf16"],
         "error: config key 'precision.name' has value 'bf16'; allowed: 'fp32' for a "
         "quantized model (its int8 weights carry fp32 scales and compute against fp32 "
         "activations)"),
        (["+recipe=evaluate", f"model.pretrained_path={q}", "cluster.gpus_per_node=2"],
         f"error: config key 'cluster.gpus_per_node' has value 2; allowed: 1 {why}"),
        (["+recipe=evaluate", f"model.pretrained_path={q}", "cluster.gpus_per_node=1",
          "parallelism=zero3"],
         f"error: config key 'parallelism.zero_stage' has value 3; allowed: 0 {why}"),
        (["+recipe=generate", f"model.pretrained_path={base}", "quantize.method=int8_dynamic",
          *one, "parallelism.backend=deepspeed"],
         f"error: config key 'parallelism.backend' has value 'deepspeed'; allowed: 'torch' {why}"),
        (["+recipe=evaluate", f"model.pretrained_path={q}", "quantize.method=int8_dynamic",
          *one],
         "error: config key 'quantize.method' has value 'int8_dynamic'; allowed: 'none' for a "
         f"model quantized already ({q} holds an int8_weight_only model)"),
        (["+recipe=evaluate", "model=bert_tiny", "quantize.method=int8_dynamic", *one],
         "error: config key 'model.family' has value 'bert'; allowed: 'gpt2' or 'llama' for "
         "quantize.method=int8_dynamic (int8 PTQ is built for causal LMs)"),
        (["+recipe=ddp", "quantize.method=int8_weight_only"],
         "error: config key 'quantize.method' has value 'int8_weight_only'; allowed: 'none' "
         "for train.task=pretrain (PTQ quantizes a trained model: +recipe=quantize, or "
         "quantize.method on evaluate and generate)"),
        (["+recipe=causal_lm", f"model.pretrained_path={q}"],
         f"error: config key 'model.pretrained_path' has value '{q}'; allowed: a "
         "full-precision model for train.task=pretrain (this one is quantized, "
         f"int8_weight_only, and cannot be trained: start from the model it was quantized "
         f"from, {base})"),
    ]
    for overrides, want in cases:
        assert _line(overrides) == want, overrides
    # what does run: a quantized model on one process, and PTQ of a trained one
    validate(make_job(["+recipe=generate", f"model.pretrained_path={q}", *one]), Hardware())
    validate(make_job(["+recipe=quantize", f"model.pretrained_path={base}"]), Hardware())


def test_an_int8_model_gets_its_one_layout_unless_the_user_chose_one(quantized_dir) -> None:
    """The launcher's step before validation (cli.execute): the keys the command line did not
    set take the only layout an int8 model runs in; the ones it set stay, to be refused."""
    from orchestrator.quantization.checks import one_process_layout

    base = ["+recipe=evaluate", f"model.pretrained_path={quantized_dir}"]
    job, note = one_process_layout(make_job(base), {"model.pretrained_path"})
    assert (job.world_size, job.parallelism.zero_stage, job.precision.name) == (1, 0, "fp32")
    assert note == ("int8 model (int8_weight_only): one process, unwrapped, fp32 "
                    "(cluster.gpus_per_node=1 parallelism=ddp precision=fp32)")
    validate(job, Hardware())  # valid as adjusted
    mine, _ = one_process_layout(make_job([*base, "cluster.gpus_per_node=2"]),
                                 {"model.pretrained_path", "cluster.gpus_per_node"})
    assert mine.cluster.gpus_per_node == 2 and mine.parallelism.zero_stage == 0
    plain, none = one_process_layout(make_job(["+recipe=evaluate"]), set())
    assert none is None and plain.parallelism.zero_stage == 3  # not an int8 model: untouched
