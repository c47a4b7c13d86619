"""config → Plan: a pure function. The Plan is plain data (plan.json); launchers only execute it."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from orchestrator.common.contract import CONFIG_YAML, DEVICE_ENV, RECIPES
from orchestrator.common.files import cache_dir
from orchestrator.common.plan import ComputeEstimate, MemoryEstimate, Plan
from orchestrator.config.derived import (
    gradient_ranks,
    pipeline_microbatches,
    pipeline_stages_per_rank,
    resolve_batch,
    strategy_name,
)
from orchestrator.config.gpus import GPU, GPUS, device_memory_bytes
from orchestrator.config.launcher import torchrun_flags
from orchestrator.config.schema import JobConfig
from orchestrator.models import pipeline, tensor_parallel
from orchestrator.models.spec_cache import cached_specs
from orchestrator.models.specs import REFERENCE, ParamSpec
from orchestrator.planning import communication, compute, memory
from orchestrator.planning.activations import activation_bytes, pipeline_activation_bytes
from orchestrator.quantization import int8


def rank_command(job: JobConfig, config_path: str) -> list[str]:
    """The per-rank program of the job's task (`common.contract.RECIPES`):
    `python -m <recipe module> <run_dir>/config.yaml`."""
    return ["-m", RECIPES[job.train.task], config_path]


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
    """Where JIT-built torch extensions (DeepSpeed's CPU Adam) are cached: keyed by the torch
    version and the interpreter the ranks run, so two virtualenvs or torch versions on one
    machine never rebuild, or load, each other's build. Read without importing torch."""
    import hashlib
    from importlib.metadata import version

    key = hashlib.sha256(str(Path(python).absolute()).encode()).hexdigest()[:10]
    return cache_dir() / "torch_extensions" / f"torch-{torch_version or version('torch')}-{key}"


@dataclass(frozen=True)
class _ModelState:
    """The strategy's model-state memory and, for DeepSpeed, the config it is computed from."""

    memory: MemoryEstimate
    deepspeed_config: Optional[dict[str, Any]]
    hpz: int  # ZeRO++ hpZ secondary partition size (1: none)


def _model_state(job: JobConfig, specs: list[ParamSpec], device: str, accum: int,
                 global_batch: int) -> _ModelState:
    """`specs`: each rank's tensor-parallel slices of the parameters (all of them without TP)."""
    p = job.parallelism
    if p.backend != "deepspeed":
        # over the data-parallel ranks left beside TP; HSDP: FSDP2 shards over dp/R ranks and
        # replicates over R
        dp = gradient_ranks(job)
        shard = dp // p.replicate_degree if p.zero_stage in (2, 3) else None
        return _ModelState(memory.estimate(
            specs, dp, p.zero_stage, job.precision.name, job.optim.name,
            job.optim.momentum, shard_size=shard, param_dtype=job.precision.param_dtype,
            float8_gather=job.precision.fp8_all_gather,
            buckets=p.tensor_parallel == 1 and p.pipeline_parallel == 1,  # DDP's
            pipeline=p.pipeline_parallel > 1,
            flat_bucket_bytes=int(p.bucket_cap_mb * 2**20) if p.pipeline_parallel > 1
            and dp > 1 else 0),
            None, 1)
    from orchestrator.planning import deepspeed_config

    ds_config = deepspeed_config.generate(job, accum, global_batch, device)
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
        max_reuse_distance=int(zero.get("stage3_max_reuse_distance", 1_000_000_000)),
        hpz_partition_size=hpz)
    return _ModelState(mem, ds_config, hpz)


def _heaviest_stage(job: JobConfig, specs: list[ParamSpec]) -> tuple[int, list[ParamSpec]]:
    """Pipeline parallelism: the pipeline rank holding the most parameters (its stages'), and
    those; else (0, all)."""
    ranks, per_rank = job.parallelism.pipeline_parallel, pipeline_stages_per_rank(job)
    if ranks == 1:
        return 0, specs
    held = [pipeline.rank_specs(specs, job.model.n_layer, ranks, per_rank, r,
                                job.parallelism.pipeline_schedule) for r in range(ranks)]
    rank = max(range(ranks), key=lambda r: sum(s.numel for s in held[r]))
    return rank, held[rank]


def _activations(job: JobConfig, accum: int) -> int:
    if job.parallelism.pipeline_parallel == 1:
        return activation_bytes(job)
    return pipeline_activation_bytes(job, job.train.micro_batch_size * accum,
                                     pipeline_microbatches(job))


def _pipeline_entry(job: JobConfig, accum: int) -> Optional[dict[str, Any]]:
    """The pipeline's shape in the plan: stages, schedule, micro-batches and the bubble
    (P - 1) / (V·M + P - 1), the share of each step a rank waits (GPipe and 1F1B: V = 1;
    interleaving V stages per rank shortens each stage, and so the bubble, V times; the
    zero-bubble schedules fill part of it with weight gradients: for them, an upper bound)."""
    p = job.parallelism
    if p.pipeline_parallel == 1:
        return None
    ranks, micro, v = p.pipeline_parallel, pipeline_microbatches(job), pipeline_stages_per_rank(job)
    return {"stages": ranks * v, "stages_per_rank": v, "schedule": p.pipeline_schedule,
            "microbatches": micro,
            "microbatch_size": job.train.micro_batch_size * accum // micro,
            "bubble_fraction": (ranks - 1) / (v * micro + ranks - 1)}


def _rank_env(job: JobConfig, device: str, cpu_count: int, python: str) -> dict[str, str]:
    """The ranks' environment: CPU ranks, and DeepSpeed's CPU Adam when offloading from GPUs,
    compute on the host, so each rank gets its share of the node's cores (a GPU rank needs
    one); DeepSpeed JIT-builds its CPU Adam on first use, cached for every later run."""
    host_compute = device == "cpu" or job.parallelism.offload_optimizer
    threads = max(1, cpu_count // job.cluster.gpus_per_node) if host_compute else 1
    env = {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", DEVICE_ENV: device}
    if device == "cuda":  # an NCCL timeout aborts the process: leave the flight record behind
        env.update(TORCH_NCCL_TRACE_BUFFER_SIZE="2000", TORCH_NCCL_DUMP_ON_TIMEOUT="1",
                   TORCH_NCCL_DEBUG_INFO_TEMP_FILE=str(Path(job.run_dir) / "nccl_trace_rank_"))
    if job.parallelism.backend == "deepspeed":
        env["TORCH_EXTENSIONS_DIR"] = str(extensions_dir(python))
    return env


def _compute(job: JobConfig, specs: list[ParamSpec], global_batch: int, qat_flops: float,
             gpu: Optional[GPU]) -> ComputeEstimate:
    """FLOPs, tokens and (with a GPU) time and cost; the DPO reference copy is memory, not
    model size."""
    model_specs = [s for s in specs if not s.name.startswith(REFERENCE)]
    layers = job.model.n_layer * (2 if job.model.family == "t5" else 1)
    return compute.estimate(
        sum(s.numel for s in model_specs), global_batch, job.data.seq_len, job.train.steps,
        layers, job.model.d_model, job.world_size,
        gpu.peak_flops(job.precision.name) if gpu else None, job.plan.mfu,
        job.plan.budget_flops, job.cluster.gpu_hour_usd,
        trainable_params=sum(s.numel for s in specs if s.trainable),
        reference=job.dpo_beta is not None, extra_flops_per_token=qat_flops,
        lookup_params=sum(s.numel for s in model_specs if s.lookup),
        trainable_lookup_params=sum(s.numel for s in model_specs if s.lookup and s.trainable))


def make_plan(job: JobConfig, device: str, cpu_count: int, python: str = sys.executable) -> Plan:
    """Everything a launcher needs, computed without allocating the model."""
    accum, global_batch = resolve_batch(job)
    specs = cached_specs(job.model, job.lora, job.dpo_beta)
    config_path = str(Path(job.run_dir) / CONFIG_YAML)
    slices = tensor_parallel.local_specs(specs, job.model.family, job.parallelism.tensor_parallel)
    heavy, slices = _heaviest_stage(job, slices)
    state = _model_state(job, slices, device, accum, global_batch)
    if heavy:  # the stage the figures describe: world / P ranks hold each stage
        rank = heavy * (job.world_size // job.parallelism.pipeline_parallel) + state.memory.rank
        state = dataclasses.replace(state, memory=dataclasses.replace(state.memory, rank=rank))
    strategy, stage = strategy_name(job), job.parallelism.zero_stage
    psi = sum(s.numel for s in specs)
    qat_bytes, qat_flops = int8.qat_overhead(job, specs)  # precision.qat
    mem = memory.with_activations(state.memory, _activations(job, accum) + qat_bytes,
                                  job.plan.memory_overhead, psi,
                                  state.memory.shard_size or gradient_ranks(job), stage,
                                  job.precision.name)
    gpu = GPUS.get(job.cluster.gpu)
    compute_estimate = _compute(job, specs, global_batch, qat_flops, gpu)
    comm = {"dp": communication.data_parallel_bytes(job, slices, accum, state.memory.shard_size),
            "tp": communication.tensor_parallel_bytes(job, accum),
            "cp": communication.context_parallel_bytes(job, accum),
            "pp": communication.pipeline_parallel_bytes(job, accum)}
    pipeline_entry = _pipeline_entry(job, accum)
    local = job.launcher.name == "local" and device == "cuda"
    return Plan(
        world_size=job.world_size, nnodes=job.cluster.nodes,
        nproc_per_node=job.cluster.gpus_per_node, device=device,
        backend="nccl" if device == "cuda" else "gloo", strategy=strategy, zero_stage=stage,
        precision=job.precision.name, micro_batch_size=job.train.micro_batch_size,
        grad_accum_steps=accum, global_batch_size=global_batch,
        commands=node_commands(job, config_path, python),
        env=_rank_env(job, device, cpu_count, python), run_dir=job.run_dir,
        config_path=config_path, memory=mem,
        compute=compute_estimate,
        deepspeed_config=state.deepspeed_config,
        mesh=memory.describe_mesh(strategy, gradient_ranks(job), stage, mem.shard_size,
                                  state.hpz, job.parallelism.tensor_parallel,
                                  job.parallelism.pipeline_parallel,
                                  job.parallelism.context_parallel),
        tensor_parallel=job.parallelism.tensor_parallel,
        pipeline=pipeline_entry,
        comm_bytes=comm,
        step_estimate=communication.step_estimate(
            job, comm, compute_estimate.step_time_s,
            pipeline_entry["bubble_fraction"] if pipeline_entry else 0.0, gpu),
        quantize=int8.plan_entry(job, specs),
        gpu=job.cluster.gpu if gpu else None,
        # on the machine itself (launcher=local) the device's own total_memory, if it is one
        device_memory_bytes=(device_memory_bytes(job.cluster.gpu) if local else gpu.memory_bytes)
        if gpu else None,
    )
