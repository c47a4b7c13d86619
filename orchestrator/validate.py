"""Cross-field checks on a typed `JobConfig`. Each failure raises one `ConfigError` naming the
key, the bad value and what is allowed. Nothing here spawns, allocates or writes anything."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import ConfigError
from orchestrator.quantize_config import check as check_quantize
from orchestrator.schema import JobConfig


@dataclass(frozen=True)
class Hardware:
    """Facts about the launching machine that decide what can run here."""

    cuda_devices: int = 0
    bf16_supported: bool = False
    capability: tuple[int, int] = (0, 0)  # CUDA compute capability of device 0
    cpu_fp16: bool | None = None  # DeepSpeed's CPU accelerator takes fp16 here; None: ask it

    def deepspeed_cpu_fp16(self) -> bool:
        """Whether DeepSpeed's CPU accelerator runs fp16 on this machine: it needs oneDNN's
        fp16 kernels, which CPUs of one machine kind may or may not have."""
        return self.cpu_fp16 if self.cpu_fp16 is not None else _ask_deepspeed_cpu_fp16()

    @staticmethod
    def detect() -> Hardware:
        if not any(os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidiactl",
                                               "/dev/kfd")):
            return Hardware()  # no GPU driver: no CUDA device, and no torch import to say so
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return Hardware(cuda_devices=n, bf16_supported=bool(n and torch.cuda.is_bf16_supported()),
                        capability=tuple(torch.cuda.get_device_capability(0)) if n else (0, 0))


@functools.cache
def _ask_deepspeed_cpu_fp16() -> bool:
    """Asked of DeepSpeed itself (the check `deepspeed.initialize` makes), in a child process
    of the ranks' interpreter, so the launcher imports neither torch nor DeepSpeed; only for a
    job that needs the answer. A probe that fails (no DeepSpeed) refuses nothing."""
    code = ("from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator\n"
            "print(bool(CPU_Accelerator().is_fp16_supported()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    return proc.returncode != 0 or proc.stdout.split()[-1:] != ["False"]


def _check_choices(obj: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            allowed = ", ".join(repr(c) for c in f.metadata["choices"])
            raise ConfigError(f"{prefix}{f.name}", value, f"one of {allowed}")


def _positive(key: str, value: float, strict: bool = True) -> None:
    if not math.isfinite(value) or (value <= 0 if strict else value < 0):
        raise ConfigError(key, value, "a number > 0" if strict else "a number >= 0")


def resolve_batch(job: JobConfig) -> tuple[int, int]:
    """(grad_accum_steps, global_batch_size) with global = micro x accum x data-parallel size."""
    t, dp = job.train, job.world_size
    per_step = t.micro_batch_size * dp
    if t.global_batch_size is None:
        accum = t.grad_accum_steps or 1
        return accum, per_step * accum
    if t.global_batch_size % per_step:
        raise ConfigError(
            "train.global_batch_size",
            t.global_batch_size,
            f"a multiple of micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}"
            f" = {per_step}",
        )
    accum = t.global_batch_size // per_step
    if t.grad_accum_steps is not None and t.grad_accum_steps != accum:
        raise ConfigError(
            "train.grad_accum_steps",
            t.grad_accum_steps,
            f"{accum} (= global_batch_size {t.global_batch_size} / (micro_batch_size "
            f"{t.micro_batch_size} x data-parallel size {dp})), or leave it unset",
        )
    return accum, t.global_batch_size


def _check_objective(job: JobConfig) -> None:
    from orchestrator.data import FAMILY_OBJECTIVE, data_vocab, ids_needed, objective_of
    from orchestrator.data.check import check_tokenizer

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
        _positive("objective.dpo_beta", o.dpo_beta)
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
        from orchestrator.models.check import check_model_dir

        check_model_dir(m.pretrained_path)
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
    _positive("generate.max_new_tokens", gen.max_new_tokens)


def _check_lora(job: JobConfig) -> None:
    lo = job.lora
    _positive("lora.rank", lo.rank, strict=False)
    if lo.rank == 0:
        return
    if job.train.task != "pretrain":
        raise ConfigError("lora.rank", lo.rank, f"0 for train.task={job.train.task} (adapters "
                          "are trained, then merged into the saved model that it loads)")
    _positive("lora.alpha", lo.alpha)
    if not 0 <= lo.dropout < 1:
        raise ConfigError("lora.dropout", lo.dropout, "a number in [0, 1)")
    from orchestrator.models import param_specs

    names = {s.name.split(".")[-2] for s in param_specs(job.model) if "." in s.name}
    missing = [t for t in lo.target_modules if t not in names]
    if missing:
        raise ConfigError("lora.target_modules", missing, "module names of this model's linear "
                          "or embedding layers, e.g. " + ", ".join(sorted(names)))
    try:  # peft's own check: the layer types it can adapt
        param_specs(job.model, lo)
    except (ValueError, TypeError) as e:
        raise ConfigError("lora.target_modules", list(lo.target_modules),
                          f"layers peft can adapt ({str(e).splitlines()[0]})") from None


STOP_SIGNAL = re.compile(r"(R:)?(SIG)?(USR1|USR2)@([0-9]+)")


def slurm_seconds(limit: str) -> int | None:
    """A Slurm time limit ("MM", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS") in
    seconds; None for anything else ("UNLIMITED", a typo sbatch will name)."""
    days, _, rest = limit.rpartition("-") if "-" in limit else ("0", "", limit)
    parts = rest.split(":")
    if not (days.isdigit() and all(x.isdigit() for x in parts) and 1 <= len(parts) <= 3):
        return None
    nums = [int(x) for x in parts]
    if "-" in limit:  # D-HH[:MM[:SS]]
        h, m, sec = (nums + [0, 0])[:3]
    else:  # MM, MM:SS or HH:MM:SS
        h, m, sec = [0, *nums] if len(nums) == 2 else ([0, nums[0], 0] if len(nums) == 1
                                                          else nums)
    return ((int(days) * 24 + h) * 60 + m) * 60 + sec


def _check_stop_signal(job: JobConfig) -> None:
    """`launcher.slurm.signal` goes to the job steps (torchrun passes it to the ranks, which
    checkpoint and stop): "B:" would send it to the batch shell alone, and the ranks would never
    see it; only USR1 and USR2 are free of other meanings to torchrun and Python. slurmctld
    checks time limits every 30 s and sends the warning when it is due within the next 30 s, so
    a lead within 30 s of the limit arrives as the job starts, before torchrun can take it."""
    spec = job.launcher.slurm.signal
    if spec is None:
        return
    found = STOP_SIGNAL.fullmatch(spec)
    if not found:
        raise ConfigError("launcher.slurm.signal", spec, "[R:]USR1@SECONDS or [R:]USR2@SECONDS "
                          "(the warning every rank gets before the time limit), or null")
    limit = slurm_seconds(job.launcher.slurm.time)
    if job.launcher.name == "slurm" and limit is not None and int(found[4]) + 30 >= limit:
        raise ConfigError("launcher.slurm.signal", spec, f"a lead under {limit - 30} s "
                          f"(launcher.slurm.time={job.launcher.slurm.time} less the 30 s "
                          "early Slurm may send it)")


def _check_replicas(job: JobConfig) -> None:
    """HSDP: R replicas of a parameter sharding over world/R ranks (FSDP2 stages 2/3, or
    DeepSpeed stage 3's hierarchical partition)."""
    r, p = job.parallelism.replicate_degree, job.parallelism
    _positive("parallelism.replicate_degree", r)
    if job.world_size % r:
        raise ConfigError("parallelism.replicate_degree", r, "a divisor of the world size "
                          f"{job.world_size} (replicas x shard group = nodes x gpus_per_node)")
    stages = (3,) if p.backend == "deepspeed" else (2, 3)
    if r > 1 and p.zero_stage not in stages:
        raise ConfigError("parallelism.replicate_degree", r, "1 unless parallelism.zero_stage "
                          f"is {' or '.join(map(str, stages))} with backend={p.backend} "
                          "(HSDP shards parameters within a group and replicates across groups)")


def _loopback(host: str) -> bool:
    import ipaddress

    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_device(job: JobConfig, hw: Hardware) -> str:
    """cluster.device, with auto = cuda when a GPU is named in cluster.gpu, or (launcher=local
    only) visible here. A remote launcher (slurm, torchrun, k8s) describes the *target* cluster:
    the submitting host's hardware, often a login node without a GPU, never decides it."""
    if job.cluster.device == "auto":
        here = hw.cuda_devices if job.launcher.name == "local" else 0
        return "cuda" if here or job.cluster.gpu != "none" else "cpu"
    return job.cluster.device


def validate(job: JobConfig, hw: Hardware) -> None:
    """Raise `ConfigError` for the first problem found; return None if the job is valid."""
    _check_choices(job)
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
        _positive(key, value)
    for key, value in [
        ("optim.weight_decay", o.weight_decay), ("optim.warmup_steps", o.warmup_steps),
        ("optim.momentum", o.momentum), ("train.grad_clip", t.grad_clip),
        ("train.seed", t.seed),
        ("debug.memory_probe_step", job.debug.memory_probe_step),
        ("checkpoint.every_steps", job.checkpoint.every_steps),
        ("fault.max_restarts", job.fault.max_restarts),
    ]:
        _positive(key, value, strict=False)
    _positive("checkpoint.keep_last", job.checkpoint.keep_last)
    _positive("dist.timeout_s", job.dist.timeout_s)
    _positive("fault.stop_timeout_s", job.fault.stop_timeout_s)
    _positive("debug.step_delay_s", job.debug.step_delay_s, strict=False)
    _check_stop_signal(job)
    if job.checkpoint.async_save and (job.parallelism.backend != "torch"
                                      or job.parallelism.zero_stage == 1):
        raise ConfigError("checkpoint.async_save", True, "false for DeepSpeed and ZeRO-1, "
                          "whose checkpoints are written by their own synchronous savers")
    for key, value in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2),
                       ("optim.min_lr_ratio", o.min_lr_ratio), ("model.dropout", m.dropout)]:
        if not 0 <= value < 1:
            raise ConfigError(key, value, "a number in [0, 1)")
    if t.grad_accum_steps is not None:
        _positive("train.grad_accum_steps", t.grad_accum_steps)
    if t.global_batch_size is not None:
        _positive("train.global_batch_size", t.global_batch_size)
    if o.warmup_steps >= t.steps and o.warmup_steps > 0:
        raise ConfigError("optim.warmup_steps", o.warmup_steps, f"fewer than train.steps={t.steps}")

    if m.d_model % m.n_head:
        raise ConfigError("model.n_head", m.n_head, f"a divisor of model.d_model={m.d_model}")
    if m.n_kv_head is not None and (m.n_kv_head <= 0 or m.n_head % m.n_kv_head):
        raise ConfigError("model.n_kv_head", m.n_kv_head, f"a divisor of model.n_head={m.n_head}")
    if m.n_kv_head is not None and m.family != "llama":
        raise ConfigError("model.n_kv_head", m.n_kv_head, "null unless model.family is 'llama'")
    if m.d_ff is not None:
        _positive("model.d_ff", m.d_ff)
    if d.seq_len > m.max_seq_len:
        raise ConfigError("data.seq_len", d.seq_len, f"at most model.max_seq_len={m.max_seq_len}")
    from orchestrator.data.check import check_sources

    check_sources(job)
    if d.name == "jsonl_sft" and m.family not in ("gpt2", "llama"):
        raise ConfigError("data.name", d.name, "'synthetic' or 'text' unless model.family is "
                          "'gpt2' or 'llama' (SFT is for causal LMs)")
    if not 0 <= job.debug.crash_rank < job.world_size:
        raise ConfigError("debug.crash_rank", job.debug.crash_rank,
                          f"a rank in 0..{job.world_size - 1}")
    _check_objective(job)
    _check_model_source(job)
    from orchestrator.data.check import check_eval

    check_eval(job)  # eval.max_batches, eval.every_steps (needs eval.holdout > 0)
    check_quantize(job)  # quantize.method, +recipe=quantize, quantized model directories
    _check_lora(job)
    if not 0 <= job.plan.mfu <= 1 or job.plan.mfu == 0:
        raise ConfigError("plan.mfu", job.plan.mfu, "a fraction in (0, 1]")
    _positive("plan.memory_overhead", job.plan.memory_overhead, strict=False)
    if job.plan.budget_flops is not None:
        _positive("plan.budget_flops", job.plan.budget_flops)
    if c.gpu_hour_usd is not None:
        _positive("cluster.gpu_hour_usd", c.gpu_hour_usd, strict=False)
    if job.launcher.name == "k8s" and job.action == "run":
        raise ConfigError("action", "run", "'plan' with launcher=k8s (it renders a PyTorchJob "
                          "manifest for kubectl; it does not submit)")
    if c.nodes > 1 and job.launcher.name == "local" and job.action == "run":
        raise ConfigError("cluster.nodes", c.nodes, "1 with launcher=local (one machine)")
    _check_replicas(job)
    if c.nodes > 1 and job.launcher.name == "torchrun" and _loopback(job.launcher.rdzv_host):
        raise ConfigError("launcher.rdzv_host", job.launcher.rdzv_host, "the first node's "
                          f"hostname or address for cluster.nodes={c.nodes} (on a loopback "
                          "address every node hosts its own rendezvous and none meet)")
    if job.launcher.name == "k8s":  # volume, image and shm keys, before anything is written
        from orchestrator.launchers.k8s import mount_path

        mount_path(job)
    if not 0 < job.launcher.rdzv_port < 65536:
        raise ConfigError("launcher.rdzv_port", job.launcher.rdzv_port, "a port in 1..65535")
    from orchestrator.check_precision import check_precision
    from orchestrator.compiling import check as check_compile
    from orchestrator.data.check import check_data

    check_compile(job, resolve_device(job, hw))  # train.compile: strategy, task, C++ compiler
    check_precision(job, resolve_device(job, hw), hw)  # precision × strategy × device
    check_data(job)  # last: it reads the data file

    accum, global_batch = resolve_batch(job)
    _check_offload_and_deepspeed(job, accum, global_batch, resolve_device(job, hw))
    _check_hardware(job, hw)


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
    from orchestrator import deepspeed_config

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
