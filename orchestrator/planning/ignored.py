"""A key the user sets either takes effect or is refused: never silently ignored.

Every key of the schema is in exactly one of three places, which tests/unit/test_ignored_keys.py
checks by walking the schema:
- `ALWAYS`: read in every combination the other checks accept;
- `CHECKED`: refused elsewhere, with its own reason, where it would not be read;
- `READERS`: read only when a condition holds. Set to anything but the schema's default where
  the condition does not hold, it is refused in one line (exit 2), or, for keys a shared YAML
  may well carry for another launcher or logger, named in a one-line warning.
A model directory (`model.pretrained_path`) decides the architecture: a shape key that differs
from the directory's config.json is named in a warning.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.common.errors import ConfigError
from orchestrator.config.host_schema import SearchConfig
from orchestrator.config.schema import JobConfig
from orchestrator.data.settings import objective_of


@dataclass(frozen=True)
class Reader:
    keys: tuple[str, ...]
    reads: Callable[[JobConfig], bool]  # whether the keys take effect in this job
    when: str  # the condition, as the message says it
    warn: bool = False  # a one-line warning instead of a refusal


def _pretrain(job: JobConfig) -> bool:
    return job.train.task == "pretrain"


def _multi_node_torchrun(job: JobConfig) -> bool:
    return job.launcher.name == "torchrun" and job.cluster.nodes > 1


READERS: tuple[Reader, ...] = (
    Reader(("step", "format", "dtype"), lambda j: j.action == "export", "action=export"),
    Reader(("quant",), lambda j: j.action == "export" and j.format == "gguf",
           "action=export format=gguf"),
    Reader(tuple(f"search.{f.name}" for f in dataclasses.fields(SearchConfig)),
           lambda j: j.action == "search", "action=search"),
    Reader(("resume",), _pretrain, "train.task=pretrain (the others start from "
           "model.pretrained_path)"),
    Reader(("lora.alpha", "lora.dropout", "lora.target_modules"), lambda j: j.lora.rank > 0,
           "lora.rank > 0"),
    Reader(("precision.init_scale", "precision.growth_interval"),
           lambda j: j.precision.name == "fp16", "precision=fp16 (the loss scaler's keys)"),
    Reader(("precision.fp8_filter",), lambda j: j.precision.name == "fp8", "precision=fp8"),
    Reader(("parallelism.bucket_cap_mb",), lambda j: j.parallelism.backend == "torch"
           and j.parallelism.zero_stage in (0, 1) and j.parallelism.tensor_parallel == 1
           and j.world_size > j.parallelism.pipeline_parallel,
           "DDP or ZeRO-1 without tensor parallelism, or data-parallel pipeline stages "
           "(gradient buckets)"),
    Reader(("parallelism.pipeline_schedule", "parallelism.pipeline_microbatches",
            "parallelism.pipeline_stages_per_rank"),
           lambda j: j.parallelism.pipeline_parallel > 1, "parallelism.pipeline_parallel > 1"),
    Reader(("cluster.network_gbps",), lambda j: j.cluster.nodes > 1 and j.cluster.gpu != "none",
           "cluster.nodes > 1 with cluster.gpu set (the plan's time across nodes)", warn=True),
    Reader(("parallelism.tp_across_nodes",), lambda j: j.parallelism.tensor_parallel > 1
           and j.cluster.nodes > 1, "parallelism.tensor_parallel > 1 on more than one node"),
    Reader(("data.path", "data.cache_dir"), lambda j: j.data.name != "synthetic",
           "data.name is text, jsonl_sft or jsonl_pref"),
    Reader(("data.num_proc", "data.text_field", "data.on_error"),
           lambda j: j.data.name == "text", "data.name=text"),
    Reader(("data.num_samples", "data.branching"), lambda j: j.data.name == "synthetic",
           "data.name=synthetic"),
    Reader(("train.steps", "train.grad_clip", "train.log_every", "train.stop_on_nonfinite",
            "train.grad_accum_steps", "train.global_batch_size",
            "train.activation_checkpointing", "optim.name", "optim.lr", "optim.weight_decay",
            "optim.schedule", "optim.warmup_steps", "optim.min_lr_ratio",
            "optim.implementation", "checkpoint.every_steps", "debug.crash_at_step",
            "debug.step_delay_s", "debug.memory_probe_step", "train.profile.steps"), _pretrain,
           "train.task=pretrain (training)"),
    Reader(("train.profile.memory",), lambda j: _pretrain(j) and bool(j.train.profile.steps),
           "train.profile.steps is set"),
    Reader(("train.save_model",), lambda j: j.train.task in ("pretrain", "quantize"),
           "train.task=pretrain or quantize"),
    Reader(("optim.beta1", "optim.beta2", "optim.eps"),
           lambda j: _pretrain(j) and j.optim.name == "adamw", "optim.name=adamw"),
    Reader(("optim.momentum",), lambda j: _pretrain(j) and j.optim.name == "sgd",
           "optim.name=sgd"),
    Reader(("checkpoint.keep_last", "checkpoint.async_save"),
           lambda j: _pretrain(j) and j.checkpoint.every_steps > 0,
           "checkpoint.every_steps > 0"),
    Reader(("debug.crash_mode", "debug.crash_rank"),
           lambda j: j.debug.crash_at_step is not None, "debug.crash_at_step is set"),
    Reader(("objective.mlm_probability",), lambda j: objective_of(j) == "mlm",
           "the mlm objective (model.family=bert)"),
    Reader(("objective.noise_density", "objective.mean_span_length"),
           lambda j: objective_of(j) == "span", "the span objective (model.family=t5)"),
    Reader(("objective.dpo_beta",), lambda j: objective_of(j) == "dpo", "the dpo objective"),
    Reader(("generate.prompts", "generate.max_new_tokens", "generate.temperature",
            "generate.top_k", "generate.top_p"), lambda j: j.train.task == "generate",
           "train.task=generate"),
    Reader(("eval.holdout",), lambda j: not (_pretrain(j) and j.eval.path is not None),
           "eval.path is unset (when training, eval.path is the held-out set: a share would "
           "only be cut from the training data)"),
    Reader(("eval.max_batches",), lambda j: j.train.task in ("evaluate", "quantize")
           or j.eval.every_steps > 0 or j.precision.qat != "none",
           "held-out evaluation runs (+recipe=evaluate or quantize, eval.every_steps, "
           "precision.qat)"),
    Reader(("launcher.rdzv_host",), _multi_node_torchrun,
           "launcher=torchrun with cluster.nodes > 1", warn=True),
    Reader(("launcher.rdzv_port",), lambda j: _multi_node_torchrun(j)
           or j.launcher.name in ("slurm", "k8s"),
           "launcher=slurm, k8s, or torchrun with cluster.nodes > 1", warn=True),
    Reader(("launcher.rdzv_timeout_s",), lambda j: _multi_node_torchrun(j)
           or j.launcher.name == "slurm", "launcher=slurm, or torchrun with cluster.nodes > 1",
           warn=True),
    Reader(tuple(f"launcher.slurm.{f.name}" for f in dataclasses.fields(
        JobConfig().launcher.slurm)), lambda j: j.launcher.name == "slurm", "launcher=slurm",
        warn=True),
    Reader(("launcher.image", *(f"launcher.k8s.{f.name}" for f in dataclasses.fields(
        JobConfig().launcher.k8s) if f.name not in ("runtime", "queue", "secret"))),
        lambda j: j.launcher.name == "k8s", "launcher=k8s", warn=True),
    Reader(("launcher.k8s.runtime", "launcher.k8s.queue", "launcher.k8s.secret"),
           lambda j: j.launcher.name == "k8s" and j.launcher.k8s.api == "trainjob",
           "launcher=k8s and launcher.k8s.api=trainjob", warn=True),
    Reader(("model.dropout", "model.attn_implementation"),
           lambda j: j.model.pretrained_path is None, "model.pretrained_path unset (a model "
           "directory is loaded as saved)", warn=True),
    Reader(("logging.wandb.project", "logging.wandb.entity", "logging.wandb.name",
            "logging.wandb.group", "logging.wandb.tags"),
           lambda j: j.logging.wandb.mode != "disabled", "logging.wandb.mode is not disabled",
           warn=True),
)

# refused elsewhere where they would not be read (the check that does it)
CHECKED = {
    "run_dir": "cli.compose_job: only with action=status|cancel|export|report",
    "precision.param_dtype": "config/precision.py: FSDP2 only",
    "precision.reduce_dtype": "config/precision.py: FSDP2 only",
    "parallelism.replicate_degree": "planning/mesh.py: HSDP stages only",
    "parallelism.tensor_parallel": "planning/mesh.py: the Llama and GPT-2 families, "
                                   "backend=torch",
    "parallelism.pipeline_parallel": "planning/mesh.py: the Llama and GPT-2 families, "
                                   "backend=torch",
    "parallelism.context_parallel": "planning/mesh.py: the Llama family, CUDA, FSDP2",
    "parallelism.offload_optimizer": "planning/preflight.py: DeepSpeed only",
    "parallelism.offload_params": "planning/preflight.py: DeepSpeed stage 3 only",
    "parallelism.deepspeed": "planning/preflight.py: DeepSpeed only",
    "data.tokenizer": "data/check.py: not byte for synthetic data",
    "data.tokenizer_path": "data/check.py: refused with data.tokenizer=byte",
    "data.sources": "data/check.py: data.name=text with data.path unset only",
    "data.chat_template": "data/check.py: jsonl_sft/jsonl_pref with an hf tokenizer only",
    "train.compile": "transforms/compile.py: training with DDP, ZeRO-1 or FSDP2 only",
    "quantize.method": "quantization/checks.py: not for training",
    "eval.every_steps": "data/check.py: training with a held-out set only",
    "eval.path": "data/check.py: data.name=text only",
    "precision.qat": "quantization/checks.py: training only",
    "debug.inf_grad_at_step": "config/precision.py: precision=fp16 only",
    "precision.fp8_all_gather": "config/precision.py: fp8 under FSDP2 only",
}

# read in every combination the checks accept (the names are labels: recorded in config.yaml
# and the W&B config)
ALWAYS = frozenset({
    "action", "model.name", "model.family", "model.pretrained_path", "lora.rank",
    "precision.name", "parallelism.name", "parallelism.backend", "parallelism.zero_stage",
    "parallelism.auto", "data.name", "data.seq_len", "data.num_workers", "data.shuffle",
    "train.task", "train.micro_batch_size", "train.seed", "objective.name", "cluster.nodes",
    "cluster.gpus_per_node", "cluster.device", "cluster.gpu", "cluster.gpu_hour_usd",
    "plan.mfu", "plan.budget_flops", "plan.memory_overhead", "launcher.name", "logging.name",
    "logging.wandb.mode", "logging.metrics_file", "logging.progress", "run.overwrite",
    "dist.timeout_s", "fault.max_restarts", "fault.stop_timeout_s",
    # the architecture: read unless model.pretrained_path decides it (`_shape_warnings`)
    "model.n_layer", "model.d_model", "model.n_head", "model.n_kv_head", "model.d_ff",
    "model.vocab_size", "model.max_seq_len", "model.tie_embeddings",
})

# our model keys -> the config.json keys of each family transformers builds
HF_KEYS = {
    "gpt2": {"n_layer": "n_layer", "d_model": "n_embd", "n_head": "n_head",
             "vocab_size": "vocab_size", "max_seq_len": "n_positions", "d_ff": "n_inner",
             "tie_embeddings": "tie_word_embeddings"},
    "llama": {"n_layer": "num_hidden_layers", "d_model": "hidden_size",
              "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads",
              "vocab_size": "vocab_size", "max_seq_len": "max_position_embeddings",
              "d_ff": "intermediate_size", "tie_embeddings": "tie_word_embeddings"},
    "bert": {"n_layer": "num_hidden_layers", "d_model": "hidden_size",
             "n_head": "num_attention_heads", "vocab_size": "vocab_size",
             "max_seq_len": "max_position_embeddings", "d_ff": "intermediate_size"},
    "t5": {"n_layer": "num_layers", "d_model": "d_model", "n_head": "num_heads",
           "vocab_size": "vocab_size", "d_ff": "d_ff"},
}


def value(tree: Any, key: str) -> Any:
    for part in key.split("."):
        tree = getattr(tree, part)
    return tree


def check_ignored(job: JobConfig) -> None:
    """Refuse the first key set where it is not read (or warn, one line, for launcher and
    W&B keys), and warn about architecture keys a model directory overrides."""
    default = JobConfig()
    for reader in READERS:
        if reader.reads(job):
            continue
        for key in reader.keys:
            got = value(job, key)
            if got == value(default, key):
                continue
            if reader.warn:
                print(f"warning: {key}={got!r} is not read: it applies with {reader.when}",
                      file=sys.stderr)
                continue
            raise ConfigError(key, got, f"{value(default, key)!r} (the default) unless "
                              f"{reader.when}: it is not read here")
    for line in _shape_warnings(job):
        print(line, file=sys.stderr)


def _shape_warnings(job: JobConfig) -> list[str]:
    """A model directory's config.json decides the architecture: name each model key that
    says otherwise (the plan, too, shows the directory's shapes)."""
    path = job.model.pretrained_path
    if not path:
        return []
    try:
        saved = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return []  # refused by the model directory's own check
    keys = HF_KEYS.get(str(saved.get("model_type")), {})
    out = []
    for ours, theirs in keys.items():
        got, there = getattr(job.model, ours), saved.get(theirs)
        if got is not None and there is not None and got != there:
            out.append(f"warning: model.{ours}={got!r} is not read: {path} has {there} "
                       f"({theirs} in its config.json), which the model is built with")
    return out
