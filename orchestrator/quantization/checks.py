"""The refusals of int8 quantization before launch (one line, exit 2; no torch): post-training
quantization (`quantize.method`, `+recipe=quantize`, quantized model directories) and int8 QAT
(`precision.qat`). The rules and their reasons are in each function's docstring and in
docs/precision.md. QAT is refused under DeepSpeed (its engine flattens the parameters and its
ZeRO-3 gathers them itself: neither is tested with torchao's fake-quantized layers, and the
end-of-run convert needs the full state dict the torch strategies give); with `bf16_pure`
(untested: the weights QAT rounds would themselves be bf16) or `fp8` (both swap the same linear
layers); on a task other than training (`train.task=pretrain`, which also fine-tunes); with LoRA
(the frozen base weights are what QAT would round, and peft wraps the fake-quantized layers;
untested) or DPO (a reference copy); without a held-out set (`eval.holdout` 0 and no
`eval.path`: the report's perplexities need one); for a model other than GPT-2 or Llama (causal
LMs, what the int8 convert and its report are built for).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from orchestrator.common.errors import ConfigError
from orchestrator.config.schema import JobConfig
from orchestrator.quantization.int8 import (
    FAMILIES,
    MARKER,
    METHODS,
    ONE_PROCESS,
    QAT_METHOD,
    WEIGHTS,
    job_method,
    model_family,
    saved_marker,
    saved_method,
)


def check(job: JobConfig) -> None:
    """Refuse, in one line, a job that quantizes what it cannot: `+recipe=quantize` without a
    trained model or a method, a method on a training run or on a model quantized already,
    training from a quantized model, a model other than a causal LM, and more than one
    process, a strategy or a precision other than fp32 for a quantized model."""
    method, task, path = job.quantize.method, job.train.task, job.model.pretrained_path
    if path:
        check_quantized_dir(path)
    saved = saved_method(path)
    if task == "quantize":
        if path is None:
            raise ConfigError("model.pretrained_path", None, "a trained model directory for "
                              "train.task=quantize, e.g. an earlier run's <run_dir>/model (PTQ "
                              "quantizes a trained model)")
        if saved is not None:
            raise ConfigError("model.pretrained_path", path, "a full-precision model for "
                              f"train.task=quantize (this one is quantized already: {saved})")
        if method == "none":
            raise ConfigError("quantize.method", method, "'int8_weight_only' or "
                              "'int8_dynamic' for train.task=quantize")
        if job.eval.holdout == 0 and job.eval.path is None:
            raise ConfigError("eval.holdout", 0.0, "a fraction in (0, 1) for train.task="
                              "quantize (perplexity is measured on it before and after), or "
                              "set eval.path")
    if task == "pretrain" and method != "none":
        raise ConfigError("quantize.method", method, "'none' for train.task=pretrain (PTQ "
                          "quantizes a trained model: +recipe=quantize, or quantize.method on "
                          "evaluate and generate)")
    if saved is not None and task == "pretrain":
        source = (saved_marker(path) or {}).get("source")
        raise ConfigError("model.pretrained_path", path, f"a full-precision model for train."
                          f"task=pretrain (this one is quantized, {saved}, and cannot be "
                          "trained: start from the model it was quantized from"
                          + (f", {source})" if source else ")"))
    if saved is not None and method != "none":
        raise ConfigError("quantize.method", method, f"'none' for a model quantized already "
                          f"({path} holds an {saved} model)")
    if saved is None and method == "none":
        return
    _check_one_process(job, method if method != "none" else str(saved))


def _check_one_process(job: JobConfig, method: str) -> None:
    family, c, p = model_family(job), job.cluster, job.parallelism
    if family not in FAMILIES:
        raise ConfigError("model.family", family, f"'gpt2' or 'llama' for quantize.method="
                          f"{method} (int8 PTQ is built for causal LMs)")
    why = ("for a quantized model (it runs on one process, unwrapped: int8 weights are not "
           f"sharded); set {ONE_PROCESS}")
    if c.nodes != 1:
        raise ConfigError("cluster.nodes", c.nodes, f"1 {why}")
    if c.gpus_per_node != 1:
        raise ConfigError("cluster.gpus_per_node", c.gpus_per_node, f"1 {why}")
    if p.backend != "torch":
        raise ConfigError("parallelism.backend", p.backend, f"'torch' {why}")
    if p.zero_stage != 0:
        raise ConfigError("parallelism.zero_stage", p.zero_stage, f"0 {why}")
    if job.precision.name != "fp32":
        raise ConfigError("precision.name", job.precision.name, "'fp32' for a quantized model "
                          "(its int8 weights carry fp32 scales and compute against fp32 "
                          "activations)")


def check_qat(job: JobConfig) -> None:
    p, value = job.precision, job.precision.qat
    if job.parallelism.backend == "deepspeed":
        raise ConfigError("precision.qat", value, "'none' with DeepSpeed: int8 QAT runs under "
                          "DDP, ZeRO-1 and FSDP2 (backend=torch), whose full state dict the "
                          "end-of-run int8 convert reads")
    if p.name in ("bf16_pure", "fp8"):
        why = ("fp8 swaps the same linear layers for float8 ones" if p.name == "fp8" else
               "untested: the weights QAT rounds would themselves be bf16")
        raise ConfigError("precision.qat", value, f"'none' with precision={p.name} ({why}); "
                          "use fp32, bf16 or fp16")
    if job.train.task != "pretrain":
        raise ConfigError("precision.qat", value, f"'none' for train.task={job.train.task} "
                          "(QAT is a way of training: pre-training or fine-tuning; +recipe="
                          "quantize is post-training quantization)")
    if job.lora.rank > 0:
        raise ConfigError("precision.qat", value, "'none' with lora.rank > 0 (LoRA + QAT is "
                          "not supported: train every weight, or quantize the merged model "
                          "with +recipe=quantize)")
    if job.dpo_beta is not None:
        raise ConfigError("precision.qat", value, "'none' for DPO (not supported: its frozen "
                          "reference copy would be fake-quantized too)")
    if job.eval.holdout == 0 and job.eval.path is None:
        raise ConfigError("eval.holdout", 0.0, "a fraction in (0, 1) with precision.qat (the "
                          "report measures held-out perplexity before and after the int8 "
                          "convert; +recipe=finetune holds none out by default), or set "
                          "eval.path")
    family = model_family(job)
    if family not in FAMILIES:
        raise ConfigError("precision.qat", value, f"'none' for model family {family} (int8 "
                          "QAT is built for the causal LMs gpt2 and llama)")


def check_quantized_dir(path: str) -> None:
    """A directory with an int8 marker or int8 weights holds both, and a marker that says how
    it was quantized: a marker that is not JSON, names no method this project writes, or was
    deleted would otherwise load as something it is not (or not at all) inside the ranks."""
    root = Path(path)
    marker, weights = root / MARKER, root / WEIGHTS
    if not marker.exists() and not weights.exists():
        return
    key, methods = "model.pretrained_path", (*METHODS, QAT_METHOD)
    if not marker.is_file():
        raise ConfigError(key, path, f"an int8 model directory with its {MARKER} (this one "
                          f"holds {WEIGHTS} without it: save it again with +recipe=quantize)")
    if saved_marker(path) is None:
        raise ConfigError(key, path, f"an int8 model directory whose {marker} is a JSON object "
                          f"naming its method, one of {', '.join(methods)} (this one is not)")
    if not weights.is_file():
        raise ConfigError(key, path, f"an int8 model directory holding {WEIGHTS} beside its "
                          f"{MARKER} (it is missing)")


# the keys that make a job's layout; a quantized model has one valid value for each
LAYOUT_KEYS = ("cluster.nodes", "cluster.gpus_per_node", "parallelism", "precision")


def one_process_layout(job: JobConfig, explicit: set[str]) -> tuple[JobConfig, str | None]:
    """An int8 model (a quantized directory, or `quantize.method`) evaluates and generates on
    one process, unwrapped, in fp32: the only layout it runs in. Set that layout for every
    layout key the command line did not set (`explicit`: the keys it named); the user's own
    choice stays, for the checks to refuse. Returns the job and the line that says so."""
    if job.train.task not in ("evaluate", "generate") or job_method(job) is None:
        return job, None
    mine = {k for k in LAYOUT_KEYS if any(e == k or e.startswith(k + ".") for e in explicit)}
    c, p, prec = job.cluster, job.parallelism, job.precision
    if "cluster.nodes" not in mine:
        c = dataclasses.replace(c, nodes=1)
    if "cluster.gpus_per_node" not in mine:
        c = dataclasses.replace(c, gpus_per_node=1)
    if "parallelism" not in mine:
        p = dataclasses.replace(p, name="ddp", backend="torch", zero_stage=0)
    if "precision" not in mine:
        prec = dataclasses.replace(prec, name="fp32")
    changed = dataclasses.replace(job, cluster=c, parallelism=p, precision=prec)
    if changed == job:
        return job, None
    return changed, (f"int8 model ({job_method(job)}): one process, unwrapped, fp32 "
                     f"({ONE_PROCESS} precision=fp32)")
