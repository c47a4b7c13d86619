"""The checks before launch: the job's own rules (config/), then what it reads (data sources,
tokenizer, model directory), then what the machine and the strategies can run. Each failure
raises one `ConfigError` naming the key, the bad value and what is allowed. Nothing here
spawns, allocates or writes anything; no torch is imported."""

from __future__ import annotations

import os
from importlib.metadata import version

from orchestrator.common.errors import ConfigError
from orchestrator.config.derived import (
    Hardware,
    missing_build_tool,
    resolve_batch,
    resolve_device,
)
from orchestrator.config.launcher import check_launcher, check_torch_version
from orchestrator.config.precision import check_precision
from orchestrator.config.rules import check_config, positive
from orchestrator.config.schema import JobConfig
from orchestrator.data import FAMILY_OBJECTIVE, data_vocab, ids_needed, objective_of
from orchestrator.data.check import check_data, check_eval, check_sources, check_tokenizer
from orchestrator.models.check import check_model_dir
from orchestrator.planning.ignored import check_ignored
from orchestrator.planning.mesh import check_context_parallel_device, check_mesh
from orchestrator.quantization import int8
from orchestrator.quantization.checks import check as check_quantize
from orchestrator.transforms.converters import check_converters


def _check_objective(job: JobConfig) -> None:
    o, family = job.objective, job.model.family
    causal = FAMILY_OBJECTIVE[family] == "causal"
    dpo = job.dpo_beta is not None
    if o.name not in ("auto", FAMILY_OBJECTIVE[family]) and not (o.name == "dpo" and causal):
        raise ConfigError("objective.name", o.name, f"'auto' or '{FAMILY_OBJECTIVE[family]}' "
                          f"for model.family={family!r}" + (" (or 'dpo')" if causal else ""))
    if dpo != (job.data.name == "jsonl_pref"):
        raise ConfigError("objective.name", o.name, "'dpo' or 'auto' with data.name="
                          f"'jsonl_pref' (preference pairs), not with {job.data.name!r}")
    if dpo and not causal:
        raise ConfigError("model.family", family, "'gpt2' or 'llama' for DPO (a causal LM)")
    if dpo:
        positive("objective.dpo_beta", o.dpo_beta)
        if job.train.task != "pretrain":
            raise ConfigError("objective.name", "dpo", "'auto' for train.task="
                              f"{job.train.task} (DPO is a training objective)")
    for key, value in [("objective.mlm_probability", o.mlm_probability),
                       ("objective.noise_density", o.noise_density)]:
        if not 0 < value < 1:
            raise ConfigError(key, value, "a fraction in (0, 1)")
    if o.mean_span_length < 1:
        raise ConfigError("objective.mean_span_length", o.mean_span_length, "a number >= 1")
    check_tokenizer(job)
    need = ids_needed(job)
    if data_vocab(job) < need:
        raise ConfigError("model.vocab_size", job.model.vocab_size,
                          f"at least {job.model.vocab_size - data_vocab(job) + need} (the data's "
                          f"{need} ids plus the {objective_of(job)} objective's special ids)")


def _check_model_source(job: JobConfig) -> None:
    m, gen = job.model, job.generate
    if m.pretrained_path is not None:
        config = os.path.join(m.pretrained_path, "config.json")
        if not os.path.isfile(config):
            raise ConfigError("model.pretrained_path", m.pretrained_path,
                              "a local Hugging Face model directory (with config.json), e.g. "
                              "an earlier run's <run_dir>/model")
        check_model_dir(m.pretrained_path, other_weights=(int8.WEIGHTS,))
    if not 0 <= job.eval.holdout < 1:
        raise ConfigError("eval.holdout", job.eval.holdout, "a fraction in [0, 1)")
    if job.train.task == "evaluate" and job.eval.holdout == 0 and job.eval.path is None:
        raise ConfigError("eval.holdout", 0.0, "a fraction in (0, 1) for train.task=evaluate, "
                          "or set eval.path")
    if job.train.task != "generate":
        return
    if m.family not in ("gpt2", "llama"):
        raise ConfigError("model.family", m.family, "'gpt2' or 'llama' for train.task=generate")
    if gen.temperature < 0 or not 0 < gen.top_p <= 1 or gen.top_k < 0:
        bad = ("generate.temperature", gen.temperature) if gen.temperature < 0 else (
            ("generate.top_k", gen.top_k) if gen.top_k < 0 else ("generate.top_p", gen.top_p))
        raise ConfigError(*bad, "temperature >= 0, top_k >= 0, 0 < top_p <= 1")
    positive("generate.max_new_tokens", gen.max_new_tokens)


def validate(job: JobConfig, hw: Hardware) -> None:
    """Raise `ConfigError` for the first problem found; return None if the job is valid.
    The job's own values first, then what it reads (data sources, tokenizer, model directory),
    then what it needs of the machine and the strategies."""
    check_config(job)  # choices, ranges, model shapes, planning keys
    check_mesh(job)  # tensor parallel x replicas x shard group = world size
    check_launcher(job)  # launcher keys: stop signal, rendezvous, k8s volume and image
    check_sources(job)
    m, d = job.model, job.data
    if d.name == "jsonl_sft" and m.family not in ("gpt2", "llama"):
        raise ConfigError("data.name", d.name, "'synthetic' or 'text' unless model.family is "
                          "'gpt2' or 'llama' (SFT is for causal LMs)")
    _check_objective(job)
    _check_model_source(job)
    check_eval(job)  # eval.max_batches, eval.every_steps (needs eval.holdout > 0)
    check_quantize(job)  # quantize.method, +recipe=quantize, quantized model directories
    device = resolve_device(job, hw)
    check_context_parallel_device(job, device)  # ring attention: CUDA only
    check_precision(job, device, hw)  # precision × strategy × device
    check_converters(job, device, hw)  # LoRA, QAT, fp8, compile (transforms/converters.py)
    check_data(job)  # it reads the data file
    check_ignored(job)  # a key set where it is not read: refused (or named in a warning)
    accum, global_batch = resolve_batch(job)
    _check_offload_and_deepspeed(job, accum, global_batch, device)
    _check_hardware(job, hw)
    if job.action == "run" and job.launcher.name in ("local", "slurm"):
        check_torch_version(version("torch"))  # the ranks run this environment's torch


# Keys the generated DeepSpeed config takes from our own fields; setting them in the
# passthrough would silently fork the two, so the error names the field to use instead.
OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.grad_clip",
    "fp16": "precision=fp16", "bf16": "precision=bf16",
    "optimizer": "optim.*", "scheduler": "optim.schedule",
}


def _check_offload_and_deepspeed(job: JobConfig, accum: int, global_batch: int,
                                 device: str) -> None:
    p = job.parallelism
    if p.backend != "deepspeed":
        for key in ("offload_optimizer", "offload_params"):
            if getattr(p, key):
                raise ConfigError(f"parallelism.{key}", True, "false unless "
                                  "parallelism.backend='deepspeed'")
        if p.deepspeed:
            raise ConfigError("parallelism.deepspeed", p.deepspeed,
                              "empty unless parallelism.backend='deepspeed'")
        return
    if p.offload_optimizer and p.zero_stage == 0:
        raise ConfigError("parallelism.offload_optimizer", True, "false at zero_stage 0")
    local = job.action == "run" and job.launcher.name == "local"  # the machine that builds
    missing = missing_build_tool("c++") if p.offload_optimizer and local else None
    if missing:
        raise ConfigError("parallelism.offload_optimizer", True, "false here: DeepSpeed's CPU "
                          f"Adam is built on first use and needs {missing}")
    if p.offload_optimizer and device == "cuda" and job.optim.name == "adamw" \
            and job.optim.implementation not in ("auto", "fused"):
        raise ConfigError("optim.implementation", job.optim.implementation, "fused with "
                          "parallelism.offload_optimizer on GPUs: the offloaded optimizer steps "
                          "with DeepSpeed's CPU Adam, a fused kernel")
    if p.offload_params and p.zero_stage != 3:
        raise ConfigError("parallelism.offload_params", True, "false unless zero_stage is 3")
    for key, ours in OWNED_DEEPSPEED_KEYS.items():
        if key in p.deepspeed:
            raise ConfigError(f"parallelism.deepspeed.{key}", p.deepspeed[key],
                              f"unset: it is generated from {ours}")
    stage = p.deepspeed.get("zero_optimization", {}).get("stage")
    if stage is not None:
        raise ConfigError("parallelism.deepspeed.zero_optimization.stage", stage,
                          "unset: it is generated from parallelism.zero_stage")
    from orchestrator.planning import deepspeed_config

    generated = deepspeed_config.generate(job, accum, global_batch, device)
    deepspeed_config.check(generated, parse=bool(p.deepspeed))


def _check_hardware(job: JobConfig, hw: Hardware) -> None:
    """Only `action=run` with launcher=local needs the hardware to be here: a plan, and a job
    for a remote launcher, describe a cluster elsewhere (its preflight checks that cluster)."""
    if job.action != "run" or job.launcher.name != "local":
        return
    device = resolve_device(job, hw)
    if device == "cuda":
        if not hw.cuda_devices:
            raise ConfigError("cluster.device", "cuda", "'cpu' or 'auto' (no CUDA device here)")
        if job.cluster.gpus_per_node > hw.cuda_devices:
            raise ConfigError("cluster.gpus_per_node", job.cluster.gpus_per_node,
                              f"at most {hw.cuda_devices} (CUDA devices visible here)")
