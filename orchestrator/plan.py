"""config → Plan: a pure function. The Plan is plain data (plan.json); launchers only execute it."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from orchestrator import compute, memory, quantize_config
from orchestrator.activations import activation_bytes
from orchestrator.checkpoint.stop import torchrun_flags
from orchestrator.data.corpus import cache_dir
from orchestrator.gpus import GPUS, device_memory_bytes
from orchestrator.redact import redact
from orchestrator.schema import JobConfig
from orchestrator.specs import REFERENCE, cached_specs
from orchestrator.validate import resolve_batch


@dataclass(frozen=True)
class Plan:
    world_size: int
    nnodes: int
    nproc_per_node: int
    device: str  # cpu | cuda
    backend: str  # gloo | nccl
    strategy: str  # ddp | zero1 | fsdp2
    zero_stage: int
    precision: str
    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int
    commands: list[list[str]]  # exact argv per node
    env: dict[str, str]
    run_dir: str
    config_path: str
    memory: memory.MemoryEstimate
    compute: compute.ComputeEstimate
    # written to <run_dir>/deepspeed.json; secrets redacted (the rank restores them, see
    # strategies/deepspeed.py: they reach it only through its environment)
    deepspeed_config: Optional[dict[str, Any]] = None
    gpu: Optional[str] = None  # the accelerator planned for (cluster.gpu)
    device_memory_bytes: Optional[int] = None
    auto_reason: Optional[str] = None  # set when parallelism.auto chose the strategy
    mesh: str = ""  # the data-parallel layout, e.g. "2 replicas x 4 shards" (HSDP)
    # int8 PTQ (quantize.method, or a quantized model): quantize_config.QuantizedSize's fields
    quantize: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        # A Plan is written, printed and logged: it never holds a secret (redact.py).
        if self.deepspeed_config is not None:
            object.__setattr__(self, "deepspeed_config", redact(self.deepspeed_config))

    @property
    def fits(self) -> Optional[bool]:
        """Whether the per-rank peak fits the planned device; None when it is unknown."""
        if self.device_memory_bytes is None:
            return None
        return self.memory.peak_total_bytes <= self.device_memory_bytes

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        mem = d["memory"]
        for name, moment in self.memory.moments.items():
            mem["moments"][name]["total_bytes"] = moment.total_bytes
        mem["peak_bytes"] = self.memory.peak_bytes
        d["fits"] = self.fits
        return d

    def write(self, path: str | Path) -> None:
        """plan.json, with every secret-named value redacted."""
        d = self.to_dict()
        d["deepspeed_config"], d["env"] = redact(d["deepspeed_config"]), redact(d["env"])
        Path(path).write_text(json.dumps(d, indent=2) + "\n")

    def deepspeed_json(self) -> str:
        """The text of <run_dir>/deepspeed.json (secrets redacted)."""
        return json.dumps(redact(self.deepspeed_config), indent=2) + "\n"


def rank_command(job: JobConfig, config_path: str) -> list[str]:
    """The per-rank program: `python -m recipes.<task> <run_dir>/config.yaml`."""
    return ["-m", f"recipes.{job.train.task}", config_path]


def node_commands(job: JobConfig, config_path: str, python: str) -> list[list[str]]:
    """One argv per node. One process: run the recipe directly; else torchrun on every node.
    Under Slurm one command runs on every node (srun), rendezvousing on the allocation's first
    node, whose address and the job id the sbatch script sets at run time."""
    program = rank_command(job, config_path)
    c, lc = job.cluster, job.launcher
    timeout = f"--rdzv-conf=join_timeout={lc.rdzv_timeout_s}"
    if lc.name == "slurm":
        return [[python, "-m", "torch.distributed.run", f"--nnodes={c.nodes}",
                 f"--nproc-per-node={c.gpus_per_node}", "--rdzv-backend=c10d",
                 "--rdzv-endpoint=${RDZV_HOST}:${RDZV_PORT}", "--rdzv-id=${SLURM_JOB_ID}",
                 timeout, f"--max-restarts={job.fault.max_restarts}", *torchrun_flags(job),
                 *program]]
    if job.world_size == 1 and job.fault.max_restarts == 0:  # restarts need torchrun
        return [[python, *program]]
    if c.nodes == 1:
        rdzv = ["--standalone"]  # picks a free local port: parallel jobs never collide
    else:
        endpoint = f"{job.launcher.rdzv_host}:{job.launcher.rdzv_port}"
        rdzv = ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                f"--rdzv-id={Path(job.run_dir).name}", timeout]
    return [
        [python, "-m", "torch.distributed.run", f"--nnodes={c.nodes}",
         f"--nproc-per-node={c.gpus_per_node}", *([f"--node-rank={n}"] if c.nodes > 1 else []),
         *rdzv, f"--max-restarts={job.fault.max_restarts}", *torchrun_flags(job), *program]
        for n in range(c.nodes)
    ]


def extensions_dir(python: str = sys.executable, torch_version: str | None = None) -> Path:
    """Where JIT-built torch extensions (DeepSpeed's comm op) are cached: keyed by the torch
    version and the interpreter the ranks run, so two virtualenvs or torch versions on one
    machine never rebuild, or load, each other's build. Read without importing torch."""
    import hashlib
    from importlib.metadata import version

    key = hashlib.sha256(str(Path(python).absolute()).encode()).hexdigest()[:10]
    return cache_dir() / "torch_extensions" / f"torch-{torch_version or version('torch')}-{key}"


def make_plan(job: JobConfig, device: str, cpu_count: int, python: str = sys.executable) -> Plan:
    """Everything a launcher needs, computed without allocating the model."""
    accum, global_batch = resolve_batch(job)
    specs = cached_specs(job.model, job.lora, job.dpo_beta)
    config_path = str(Path(job.run_dir) / "config.yaml")
    # CPU ranks, and DeepSpeed's CPU Adam when offloading from GPUs, compute on the host: give
    # each rank its share of the node's cores (a GPU rank needs one)
    host_compute = device == "cpu" or job.parallelism.offload_optimizer
    threads = max(1, cpu_count // job.cluster.gpus_per_node) if host_compute else 1
    env = {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
           "ORCHESTRATOR_DEVICE": device}
    p = job.parallelism
    replicas = p.replicate_degree
    if p.backend == "deepspeed":
        from orchestrator import deepspeed_config

        ds_config = deepspeed_config.generate(job, accum, global_batch, device)
        # DeepSpeed JIT-builds a comm op on first use; cache it once for every later run.
        env["TORCH_EXTENSIONS_DIR"] = str(extensions_dir(python))
        zero = ds_config["zero_optimization"]
        # ZeRO++ hpZ (generated for replicate_degree R > 1, or passed through): a secondary
        # partition within groups of this many ranks
        hpz = max(1, zero.get("zero_hpz_partition_size", 1)) if p.zero_stage == 3 else 1
        mem = memory.estimate_deepspeed(
            specs, job.world_size, p.zero_stage, job.precision.name, p.offload_optimizer,
            p.offload_params, job.optim.name, job.optim.momentum,
            persistence_threshold=zero.get("stage3_param_persistence_threshold", 100_000),
            prefetch_bucket_size=int(zero.get("stage3_prefetch_bucket_size", 50_000_000)),
            max_live_parameters=int(zero.get("stage3_max_live_parameters", 1_000_000_000)),
            hpz_partition_size=hpz)
        strategy = "deepspeed"
    else:
        ds_config = None
        hpz = 1
        # HSDP: FSDP2 shards over world/R ranks and replicates over R
        shard = job.world_size // replicas if p.zero_stage in (2, 3) else None
        mem = memory.estimate(specs, job.world_size, p.zero_stage, job.precision.name,
                              job.optim.name, job.optim.momentum, shard_size=shard,
                              param_dtype=job.precision.param_dtype)
        strategy = memory.strategy_name(p.zero_stage)
    psi = sum(s.numel for s in specs)
    # DPO: the frozen reference copy is memory, not model size
    n_model = sum(s.numel for s in specs if not s.name.startswith(REFERENCE))
    qat_bytes, qat_flops = quantize_config.qat_overhead(job, specs)  # precision.qat
    mem = memory.with_activations(mem, activation_bytes(job) + qat_bytes,
                                  job.plan.memory_overhead, psi,
                                  mem.shard_size or job.world_size, p.zero_stage,
                                  job.precision.name)
    gpu = GPUS.get(job.cluster.gpu)
    local = job.launcher.name == "local" and device == "cuda"
    layers = job.model.n_layer * (2 if job.model.family == "t5" else 1)
    return Plan(
        world_size=job.world_size,
        nnodes=job.cluster.nodes,
        nproc_per_node=job.cluster.gpus_per_node,
        device=device,
        backend="nccl" if device == "cuda" else "gloo",
        strategy=strategy,
        zero_stage=job.parallelism.zero_stage,
        precision=job.precision.name,
        micro_batch_size=job.train.micro_batch_size,
        grad_accum_steps=accum,
        global_batch_size=global_batch,
        commands=node_commands(job, config_path, python),
        env=env,
        run_dir=job.run_dir,
        config_path=config_path,
        memory=mem,
        compute=compute.estimate(
            n_model, global_batch, job.data.seq_len, job.train.steps, layers, job.model.d_model,
            job.world_size, gpu.peak_flops(job.precision.name) if gpu else None, job.plan.mfu,
            job.plan.budget_flops, job.cluster.gpu_hour_usd,
            trainable_params=sum(s.numel for s in specs if s.trainable),
            reference=job.dpo_beta is not None, extra_flops_per_token=qat_flops),
        deepspeed_config=ds_config,
        mesh=memory.describe_mesh(strategy, job.world_size, p.zero_stage, mem.shard_size, hpz),
        quantize=quantize_config.plan_entry(job, specs),
        gpu=job.cluster.gpu if gpu else None,
        # on the machine itself (launcher=local) the device's own total_memory, if it is one
        device_memory_bytes=(device_memory_bytes(job.cluster.gpu) if local else gpu.memory_bytes)
        if gpu else None,
    )
