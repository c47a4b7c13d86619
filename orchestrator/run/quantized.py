"""Running an int8 model inside a rank. A quantized model runs on one process, unwrapped
(`inference_engine`: int8 tensors are neither bucketed nor sharded), for `+recipe=evaluate`,
`generate` and `quantize`; and the end of an int8 QAT run (`finish_qat`).

`finish_qat` runs after the last step: the full state dict on rank 0 (FSDP2 cannot convert its
sharded modules: torchao's convert would mix DTensors and plain tensors), loaded into a fresh
prepared model there; its held-out perplexity (fake-quantized, as trained; one process, like
`+recipe=evaluate` on the saved model), then converted to int8 with the same scheme (torchao's
`IntxWeightOnlyConfig(int8, PerAxis(0))`: int8 data, an fp32 scale and an int8 zero point per
output row, like PTQ's `int8_weight_only`); its held-out perplexity; the model saved with
`ptq.save_quantized` (method `qat_int8`) to `<run_dir>/model`, and the report as PTQ writes
it (`<run_dir>/quantize.json`, a `quantize` event). No fp32 model is saved: the QAT-trained
weights are meant to be used rounded, and for GPT-2 their layout is `nn.Linear`'s, not the
`Conv1D` one `from_pretrained` expects; the last checkpoint holds them in fp32.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from orchestrator.common.contract import DEVICE_ENV, QUANTIZE_JSON
from orchestrator.config.schema import JobConfig
from orchestrator.quantization.int8 import QAT_METHOD, job_method
from orchestrator.quantization.ptq import (
    linear_weight_bytes,
    quantize_model,
    save_quantized,
    torchao,
    weight_bytes,
)
from orchestrator.quantization.qat import convert
from orchestrator.run import distributed
from orchestrator.run.checkpoint.final import MODEL_DIR, write_tokenizer
from orchestrator.run.evaluation import eval_mode, held_out_sums, summarize
from orchestrator.run.metrics import write_record
from orchestrator.run.setup import build_for_rank
from orchestrator.run.setup import run_inference as run_with_strategy
from orchestrator.run.strategies.base import Engine, build_optimizer


def inference_engine(model: nn.Module, job: JobConfig, device: str) -> Engine:
    """The quantized model on one process, unwrapped (no strategy: int8 tensors are neither
    bucketed nor sharded), behind the Engine interface evaluation and generation use. The
    optimizer is never stepped; Engine asks for one."""
    model = model.to(device)
    return Engine(model, build_optimizer(model.parameters(), job), job, device)


def run_inference(job: JobConfig, body: Callable[[Engine, distributed.RankInfo], None]) -> None:
    """`strategies.run_inference` for evaluate and generate, but when the job's model is
    quantized (`quantize.method`, or a quantized model directory): then the model is loaded
    (quantized on the fly with `quantize.method`) and run by `inference_engine`."""
    if job_method(job) is None:
        run_with_strategy(job, body)
        return
    device = os.environ.get(DEVICE_ENV, "cpu")
    info = distributed.init(device, job.dist.timeout_s)
    try:
        model = build_for_rank(job, info)  # a quantized directory loads quantized
        if job.quantize.method != "none":
            quantize_model(model, job.quantize.method)
        body(inference_engine(model, job, device), info)
        del model
    finally:
        distributed.shutdown()


def _measure(engine: Engine, held_out: Dataset, job: JobConfig) -> dict[str, float]:
    """Held-out loss, perplexity and accuracy on this process alone (world size 1)."""
    with eval_mode(engine.model):
        return summarize(held_out_sums(engine, held_out, job, 0, 1))


def finish_qat(engine: Engine, job: JobConfig, info: distributed.RankInfo, held_out: Dataset,
           logger: Any, tokenizer_json: Path | None) -> dict[str, Any] | None:
    """Measure the fake-quantized model, convert it on rank 0, measure, save, report (every
    rank calls it; the report on rank 0, None elsewhere)."""
    state = engine.full_state_dict()  # collective
    if info.rank != 0:  # rank 0 measures on its own; its two all-reduces add these zeros
        for _ in range(2):
            dist.all_reduce(torch.zeros(3, device=engine.device))
        return None
    model = build_for_rank(job, distributed.RankInfo(0, 1, 0, info.device), converters=("qat",))
    model.load_state_dict(state)
    del state
    bytes_before = linear_weight_bytes(model)[0], weight_bytes(model)
    before = _measure(inference_engine(model, job, engine.device), held_out, job)
    start = time.perf_counter()
    convert(model)
    convert_s = time.perf_counter() - start
    layers = linear_weight_bytes(model)[1]
    int8 = inference_engine(model, job, engine.device)
    after = _measure(int8, held_out, job)
    out = None
    if job.train.save_model:
        out = save_quantized(model, Path(job.run_dir) / MODEL_DIR, QAT_METHOD,
                             job.model.pretrained_path,
                             extra=lambda d: write_tokenizer(d, tokenizer_json))
    report = {
        "method": QAT_METHOD, "model": job.model.pretrained_path,
        "quantized_model": None if out is None else str(out), "torchao": torchao().__version__,
        "linear_layers": layers, "quantize_s": convert_s, "tokens": after["tokens"],
        "linear_weight_bytes_before": bytes_before[0],
        "linear_weight_bytes_after": linear_weight_bytes(model)[0],
        "linear_weight_ratio": bytes_before[0] / linear_weight_bytes(model)[0],
        "weight_bytes_before": bytes_before[1], "weight_bytes_after": weight_bytes(model),
        **{f"{k}_{when}": m[k] for when, m in (("before", before), ("after", after))
           for k in ("loss", "perplexity", "accuracy")},
    }
    write_record(Path(job.run_dir) / QUANTIZE_JSON, report, "after converting the QAT model")
    logger.event("quantize", report)
    return report
