"""int8 PTQ through the CLI, as a user runs it: `+recipe=quantize` on a trained model, then
`+recipe=evaluate` and `+recipe=generate` on the quantized directory it saved (real launches,
one process each: a quantized model is not sharded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.common.records import read_metrics
from orchestrator.data.tokenizer import ByteTokenizer
from orchestrator.quantization.int8 import MARKER
from tests.conftest import run_cli, run_ok
from tests.unit.test_quantize import DATA, EXPECTED, PERPLEXITY_BOUND, load, train_tiny

pytestmark = pytest.mark.slow
ONE = ["cluster.gpus_per_node=1", "parallelism=ddp"]
SYNTHETIC = ["data=synthetic", *DATA]  # the data the model was trained on, held-out share


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    """A GPT-2 trained 100 steps, quantized by `+recipe=quantize quantize.method=int8_dynamic`."""
    root = tmp_path_factory.mktemp("ptq_cli")
    trained = train_tiny("gpt2_tiny", root / "trained")
    proc = run_ok(["+recipe=quantize", f"model.pretrained_path={trained}",
                    "quantize.method=int8_dynamic", *SYNTHETIC], root / "q")
    assert "int8_dynamic: 8 linear layers 384.0 KiB -> 101.6 KiB (3.78x smaller)" in proc.stdout
    return root / "q"


def test_quantize_reports_bytes_and_perplexity_and_saves_the_model(quantized) -> None:
    report = json.loads((quantized / "quantize.json").read_text())
    fp32_bytes, int8_bytes, layers = EXPECTED["gpt2"]
    assert (report["linear_weight_bytes_before"], report["linear_weight_bytes_after"],
            report["linear_layers"]) == (fp32_bytes, int8_bytes, layers)
    assert report["linear_weight_ratio"] >= 3
    assert report["weight_bytes_after"] < report["weight_bytes_before"]
    before, after = report["perplexity_before"], report["perplexity_after"]
    assert after != before and abs(after / before - 1) <= PERPLEXITY_BOUND, (before, after)
    events = [e for e in read_metrics(quantized / "metrics.jsonl", events=True)
              if e.get("event") == "quantize"]
    assert len(events) == 1 and events[0]["perplexity_after"] == after
    planned = json.loads((quantized / "plan.json").read_text())["quantize"]
    assert planned["linear_int8_bytes"] == report["linear_weight_bytes_after"]
    assert planned["weight_int8_bytes"] == report["weight_bytes_after"]
    assert json.loads((quantized / "model" / MARKER).read_text())["method"] == "int8_dynamic"


def test_evaluate_and_generate_load_the_quantized_model(quantized, tmp_path) -> None:
    model_dir = quantized / "model"
    # the recipe's defaults (2 ranks, ZeRO-3): the one layout an int8 model runs in is used
    proc = run_ok(["+recipe=evaluate", f"model.pretrained_path={model_dir}", *SYNTHETIC],
                  tmp_path / "eval")
    assert "int8 model (int8_dynamic): one process, unwrapped, fp32 (cluster.gpus_per_node=1 " \
        "parallelism=ddp precision=fp32)" in proc.stdout
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    report = json.loads((quantized / "quantize.json").read_text())
    assert result["quantized"] == "int8_dynamic"
    # the same held-out samples through the saved int8 model: the quantized loss, to the bit
    assert result["loss"] == report["loss_after"] != report["loss_before"]

    run_ok(["+recipe=generate", f"model.pretrained_path={model_dir}", *ONE,
                   "generate.prompts=[The,A list]", "generate.temperature=0",
                   "generate.max_new_tokens=12"], tmp_path / "gen")
    rows = [json.loads(x) for x in (tmp_path / "gen" / "generations.jsonl").open()]
    tok, model = ByteTokenizer(), load(model_dir)
    assert any("Int8" in type(m.weight).__name__ for m in model.modules()
               if isinstance(m, torch.nn.Linear))  # the int8 weights run
    # greedy: the int8 model's own argmax tokens, from a plain loop over its forward (one
    # prompt at a time, no cache, no padding), not from our batched sampler
    want = [plain_greedy(model, tok.encode(r["prompt"]), 12, tok) for r in rows]
    assert [r["token_ids"] for r in rows] == want


def plain_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int,
                 tok: ByteTokenizer) -> list[int]:
    """The next token is the argmax of the last position's logits over the ids the tokenizer
    has (the model's 512 outputs include ids no text decodes to), until end-of-text (kept)."""
    ids, out = list(prompt), []
    with torch.no_grad():
        while len(out) < new_tokens and tok.eos_id not in out:
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits[:tok.vocab_size].argmax()))
    return out


def test_a_quantized_model_on_two_ranks_is_refused_in_one_line(quantized, tmp_path) -> None:
    """Only when the user asks for two ranks themselves."""
    proc = run_cli(["+recipe=evaluate", f"model.pretrained_path={quantized / 'model'}",
                    "cluster.gpus_per_node=2"], tmp_path / "run")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: config key 'cluster.gpus_per_node' has value 2; allowed: 1 for a quantized "
        "model (it runs on one process, unwrapped: int8 weights are not sharded); set "
        "cluster.gpus_per_node=1 parallelism=ddp"]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
