"""int8 quantization-aware training (QAT, `precision.qat=int8`) with torchao's `QATConfig`.

`prepare` runs in every rank after the model is built and before the strategy wraps it
(`strategies.setup`): GPT-2's `Conv1D` layers become `nn.Linear` (`quantize.conv1d_to_linear`),
then every linear layer but a head tied to the input embedding becomes torchao's
`FakeQuantizedLinear`, whose forward multiplies by its weight rounded to int8 per output row,
symmetric (the rounding passes gradients straight through). The fake quantizers hold no tensors,
so parameter names and shapes stay those of the plain `nn.Linear`s: DDP's broadcast from rank
0, FSDP2's sharding and rank-0 copy, and checkpoints work unchanged (ranks other than 0 prepare
their meta-device model just the same).

`finish` runs after the last step: the full state dict on rank 0 (FSDP2 cannot convert its
sharded modules: torchao's convert would mix DTensors and plain tensors), loaded into a fresh
prepared model there; its held-out perplexity (fake-quantized, as trained; one process, like
`+recipe=evaluate` on the saved model), then converted to int8 with the same scheme (torchao's
`IntxWeightOnlyConfig(int8, PerAxis(0))`: int8 data, an fp32 scale and an int8 zero point per
output row, like PTQ's `int8_weight_only`); its held-out perplexity; the model saved with
`quantize.save_quantized` (method `qat_int8`) to `<run_dir>/model`, and the report as PTQ writes
it (`<run_dir>/quantize.json`, a `quantize` event). No fp32 model is saved: the QAT-trained
weights are meant to be used rounded, and for GPT-2 their layout is `nn.Linear`'s, not the
`Conv1D` one `from_pretrained` expects; the last checkpoint holds them in fp32.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from orchestrator import distributed
from orchestrator.checkpoint.final import MODEL_DIR, write_tokenizer
from orchestrator.evaluation import eval_mode, held_out_sums, summarize
from orchestrator.metrics import write_record
from orchestrator.quantize import (
    _targets,
    conv1d_to_linear,
    inference_engine,
    linear_weight_bytes,
    save_quantized,
    torchao,
    weight_bytes,
)
from orchestrator.quantize_config import QAT_METHOD
from orchestrator.schema import JobConfig
from orchestrator.strategies.base import Engine

REPORT = "quantize.json"


def base_config() -> Any:
    """The int8 scheme QAT simulates and converts to: weight-only, symmetric, per output row."""
    torchao()
    from torchao.quantization import IntxWeightOnlyConfig, PerAxis

    return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))


def _apply(model: nn.Module, config: Any) -> None:
    from torchao.quantization import quantize_

    quantize_(model, config, filter_fn=_targets(model))


def prepare(model: nn.Module) -> int:
    """Swap the linear layers for fake-quantized ones in place; returns how many."""
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    conv1d_to_linear(model)
    _apply(model, QATConfig(base_config(), step="prepare"))
    return sum(isinstance(m, FakeQuantizedLinear) for m in model.modules())


def convert(model: nn.Module) -> None:
    """A prepared (unwrapped, unsharded) model to int8 in place."""
    from torchao.quantization.qat import QATConfig

    _apply(model, QATConfig(base_config(), step="convert"))


def ptq(model: nn.Module) -> None:
    """The same int8 scheme applied after training (PTQ) to a plain fp32 model, in place: what
    QAT's convert does without the training that saw the rounding."""
    conv1d_to_linear(model)
    _apply(model, base_config())


def _measure(engine: Engine, held_out: Dataset, job: JobConfig) -> dict[str, float]:
    """Held-out loss, perplexity and accuracy on this process alone (world size 1)."""
    with eval_mode(engine.model):
        return summarize(held_out_sums(engine, held_out, job, 0, 1))


def finish(engine: Engine, job: JobConfig, info: distributed.RankInfo, held_out: Dataset,
           logger: Any, tokenizer_json: Path | None) -> dict[str, Any] | None:
    """Measure the fake-quantized model, convert it on rank 0, measure, save, report (every
    rank calls it; the report on rank 0, None elsewhere)."""
    state = engine.full_state_dict()  # collective
    if info.rank != 0:  # rank 0 measures on its own; its two all-reduces add these zeros
        for _ in range(2):
            dist.all_reduce(torch.zeros(3, device=engine.device))
        return None
    from orchestrator.strategies import build_for_rank

    model = build_for_rank(job, distributed.RankInfo(0, 1, 0, info.device))
    prepare(model)
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
    write_record(Path(job.run_dir) / REPORT, report, "after converting the QAT model")
    logger.event("quantize", report)
    return report
