"""Rules on the typed job alone (no files, no machine): allowed choices, numbers in range,
shapes that must divide, keys that only some strategies take. One line each, naming the key,
the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from orchestrator.common.errors import ConfigError
from orchestrator.config.derived import torch_loss_scaler
from orchestrator.config.schema import JobConfig


def check_choices(obj: Any, prefix: str = "") -> None:
    """Every field with `choices` (config/schema.py) holds one of them."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{prefix}{f.name}.")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            allowed = ", ".join(repr(c) for c in f.metadata["choices"])
            raise ConfigError(f"{prefix}{f.name}", value, f"one of {allowed}")


def positive(key: str, value: float, strict: bool = True) -> None:
    """`value` is a finite number > 0 (>= 0 unless `strict`)."""
    if not math.isfinite(value) or (value <= 0 if strict else value < 0):
        raise ConfigError(key, value, "a number > 0" if strict else "a number >= 0")


def check_config(job: JobConfig) -> None:
    """The job's own values: choices, ranges, model shapes, planning keys (the device mesh:
    planning/mesh.py)."""
    check_choices(job)
    _check_numbers(job)
    _check_model_shape(job)
    if not 0 <= job.debug.crash_rank < job.world_size:
        raise ConfigError("debug.crash_rank", job.debug.crash_rank,
                          f"a rank in 0..{job.world_size - 1}")
    positive("lora.rank", job.lora.rank, strict=False)
    _check_files(job)
    if not 0 <= job.plan.mfu <= 1 or job.plan.mfu == 0:
        raise ConfigError("plan.mfu", job.plan.mfu, "a fraction in (0, 1]")
    positive("plan.memory_overhead", job.plan.memory_overhead, strict=False)
    if job.plan.budget_flops is not None:
        positive("plan.budget_flops", job.plan.budget_flops)
    if job.cluster.gpu_hour_usd is not None:
        positive("cluster.gpu_hour_usd", job.cluster.gpu_hour_usd, strict=False)
    if job.optim.implementation == "fused" and torch_loss_scaler(job):
        raise ConfigError("optim.implementation", "fused", "auto or for_loop with precision=fp16 "
                          "(torch 2.13's fused step fails on its loss scaler's found-inf flag, "
                          "seen under FSDP2)")


def _check_numbers(job: JobConfig) -> None:
    m, t, o, d, c = job.model, job.train, job.optim, job.data, job.cluster

    for key, value in [
        ("model.n_layer", m.n_layer), ("model.d_model", m.d_model), ("model.n_head", m.n_head),
        ("model.vocab_size", m.vocab_size), ("model.max_seq_len", m.max_seq_len),
        ("data.seq_len", d.seq_len), ("data.num_samples", d.num_samples),
        ("data.branching", d.branching), ("train.steps", t.steps),
        ("train.micro_batch_size", t.micro_batch_size), ("train.log_every", t.log_every),
        ("optim.lr", o.lr), ("optim.eps", o.eps), ("cluster.nodes", c.nodes),
        ("cluster.gpus_per_node", c.gpus_per_node),
        ("precision.init_scale", job.precision.init_scale),
        ("precision.growth_interval", job.precision.growth_interval),
    ]:
        positive(key, value)
    for key, value in [
        ("optim.weight_decay", o.weight_decay), ("optim.warmup_steps", o.warmup_steps),
        ("optim.momentum", o.momentum), ("train.grad_clip", t.grad_clip),
        ("train.seed", t.seed),
        ("debug.memory_probe_step", job.debug.memory_probe_step),
        ("checkpoint.every_steps", job.checkpoint.every_steps),
        ("fault.max_restarts", job.fault.max_restarts),
    ]:
        positive(key, value, strict=False)
    positive("checkpoint.keep_last", job.checkpoint.keep_last)
    positive("dist.timeout_s", job.dist.timeout_s)
    positive("fault.stop_timeout_s", job.fault.stop_timeout_s)
    positive("debug.step_delay_s", job.debug.step_delay_s, strict=False)
    if job.checkpoint.async_save and (job.parallelism.backend != "torch"
                                      or job.parallelism.zero_stage == 1):
        raise ConfigError("checkpoint.async_save", True, "false for DeepSpeed and ZeRO-1, "
                          "whose checkpoints are written by their own synchronous savers")
    for key, value in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2),
                       ("optim.min_lr_ratio", o.min_lr_ratio), ("model.dropout", m.dropout)]:
        if not 0 <= value < 1:
            raise ConfigError(key, value, "a number in [0, 1)")
    if t.grad_accum_steps is not None:
        positive("train.grad_accum_steps", t.grad_accum_steps)
    if t.global_batch_size is not None:
        positive("train.global_batch_size", t.global_batch_size)
    if o.warmup_steps >= t.steps and o.warmup_steps > 0:
        raise ConfigError("optim.warmup_steps", o.warmup_steps, f"fewer than train.steps={t.steps}")
    profiled = list(t.profile.steps)
    if profiled and (len(profiled) != 2 or not 1 <= profiled[0] <= profiled[1] <= t.steps):
        raise ConfigError("train.profile.steps", profiled, "[first, last] with 1 <= first <= "
                          f"last <= train.steps={t.steps} (steps first..last are profiled)")


def _check_model_shape(job: JobConfig) -> None:
    m, d = job.model, job.data
    if m.d_model % m.n_head:
        raise ConfigError("model.n_head", m.n_head, f"a divisor of model.d_model={m.d_model}")
    if m.n_kv_head is not None and (m.n_kv_head <= 0 or m.n_head % m.n_kv_head):
        raise ConfigError("model.n_kv_head", m.n_kv_head, f"a divisor of model.n_head={m.n_head}")
    if m.n_kv_head is not None and m.family != "llama":
        raise ConfigError("model.n_kv_head", m.n_kv_head, "null unless model.family is 'llama'")
    if m.d_ff is not None:
        positive("model.d_ff", m.d_ff)
    if d.seq_len > m.max_seq_len:
        raise ConfigError("data.seq_len", d.seq_len, f"at most model.max_seq_len={m.max_seq_len}")


def _check_files(job: JobConfig) -> None:
    """Keys that name files: the metrics file is a plain file name inside the run directory
    (never a user's file elsewhere); a resume from a checkpoint inside the run directory
    cannot also replace that directory (`run.overwrite` would delete the checkpoint first)."""
    name = job.logging.metrics_file
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ConfigError("logging.metrics_file", name, "a file name inside the run directory, "
                          "e.g. metrics.jsonl (no directory part)")
    if job.data.num_proc is not None and job.data.num_proc < 1:
        raise ConfigError("data.num_proc", job.data.num_proc, "a number >= 1, or null for the "
                          "CPU count")
    if job.run.overwrite and job.resume not in ("auto", "never"):
        resume, run_dir = Path(job.resume).absolute(), Path(job.run_dir).absolute()
        if resume == run_dir or run_dir in resume.parents:
            raise ConfigError("run.overwrite", True, f"false when resuming from {job.resume}, "
                              "inside the run directory it would delete first (resume from "
                              "it in place, or copy it elsewhere)")
