"""int8 post-training quantization of a trained causal LM, on one process:
`python -m orchestrator +recipe=quantize model.pretrained_path=<run_dir>/model
[quantize.method=int8_weight_only|int8_dynamic]`.

Held-out perplexity (the evaluate recipe's pass over the last `eval.holdout` share, or
`eval.path`) and the weights' bytes are measured on the fp32 model, then again after
`quantization.ptq.quantize_model`; the quantized model is saved to `<run_dir>/model`, where
`+recipe=evaluate` and `+recipe=generate` load it, and the numbers go to
`<run_dir>/quantize.json`, a `quantize` event in metrics.jsonl (and W&B) and one summary line.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from orchestrator.common.contract import DEVICE_ENV, QUANTIZE_JSON
from orchestrator.common.units import human_bytes
from orchestrator.config.load import load_job
from orchestrator.config.schema import JobConfig
from orchestrator.data import train_and_held_out
from orchestrator.quantization.ptq import (
    linear_weight_bytes,
    quantize_model,
    save_quantized,
    torchao,
    weight_bytes,
)
from orchestrator.run import distributed
from orchestrator.run.checkpoint.final import MODEL_DIR
from orchestrator.run.evaluation import eval_mode, held_out_sums, summarize
from orchestrator.run.metrics import log_event, write_record
from orchestrator.run.quantized import inference_engine
from orchestrator.run.rank_main import run_rank
from orchestrator.run.setup import build_for_rank
from orchestrator.run.strategies.base import Engine


def run(config_path: str) -> None:
    job = load_job(config_path)
    device = os.environ.get(DEVICE_ENV, "cpu")
    info = distributed.init(device, job.dist.timeout_s)
    try:
        quantize(job, inference_engine(build_for_rank(job, info), job, device))
    finally:
        distributed.shutdown()


def main(argv: list[str]) -> int:
    return run_rank(lambda: run(argv[1]))


def measure(engine: Engine, held_out: Dataset, job: JobConfig) -> dict[str, Any]:
    """Held-out loss, perplexity and accuracy, and the weights' bytes, of the model as it is."""
    model: nn.Module = engine.model
    with eval_mode(model):
        result = summarize(held_out_sums(engine, held_out, job, 0, 1))
    linear, layers = linear_weight_bytes(model)
    return {**result, "linear_weight_bytes": linear, "weight_bytes": weight_bytes(model),
            "linear_layers": layers}


def quantize(job: JobConfig, engine: Engine) -> dict[str, Any]:
    """Measure, quantize in place, measure again, save; the report (also written and logged)."""
    _, held_out = train_and_held_out(job)
    method = job.quantize.method
    before = measure(engine, held_out, job)
    start = time.perf_counter()
    layers = quantize_model(engine.model, method)
    quantize_s = time.perf_counter() - start
    after = measure(engine, held_out, job)
    out = save_quantized(engine.model, Path(job.run_dir) / MODEL_DIR, method,
                         job.model.pretrained_path)
    report = {
        "method": method, "model": job.model.pretrained_path, "quantized_model": str(out),
        "torchao": torchao().__version__, "linear_layers": layers, "quantize_s": quantize_s,
        "tokens": after["tokens"],
        "linear_weight_bytes_before": before["linear_weight_bytes"],
        "linear_weight_bytes_after": after["linear_weight_bytes"],
        "linear_weight_ratio": before["linear_weight_bytes"] / after["linear_weight_bytes"],
        "weight_bytes_before": before["weight_bytes"], "weight_bytes_after": after["weight_bytes"],
        **{f"{k}_{when}": m[k] for when, m in (("before", before), ("after", after))
           for k in ("loss", "perplexity", "accuracy")},
    }
    write_record(Path(job.run_dir) / QUANTIZE_JSON, report, "after quantizing")
    log_event(job, "quantize", report)
    print(summary(report), flush=True)
    return report


def summary(r: dict[str, Any]) -> str:
    """One line: bytes before -> after, held-out perplexity before -> after, where it went."""
    change = r["perplexity_after"] / r["perplexity_before"] - 1
    return (f"{r['method']}: {r['linear_layers']} linear layers "
            f"{human_bytes(r['linear_weight_bytes_before'])} -> "
            f"{human_bytes(r['linear_weight_bytes_after'])} "
            f"({r['linear_weight_ratio']:.2f}x smaller), model weights "
            f"{human_bytes(r['weight_bytes_before'])} -> {human_bytes(r['weight_bytes_after'])}; "
            f"held-out perplexity {r['perplexity_before']:.4f} -> {r['perplexity_after']:.4f} "
            f"({change:+.2%}); quantized model: {r['quantized_model']}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
