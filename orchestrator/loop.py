"""The one training loop: LR schedule, data, engine steps, metrics, memory probe."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from orchestrator.metrics import NullLogger
from orchestrator.schema import JobConfig, OptimConfig
from orchestrator.strategies.base import Engine


class InjectedCrash(RuntimeError):
    """Raised by `debug.crash_at_step` to exercise the failure path."""


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` (or constant)."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / max(1, cfg.warmup_steps)
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class MemoryProbe:
    """Records this rank's model-state bytes at each probed moment of one step."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.moments: dict[str, dict[str, int]] = {}

    def __call__(self, moment: str) -> None:
        measured = self.engine.model_state_bytes()
        measured["total_bytes"] = sum(measured.values())
        self.moments[moment] = measured


def train(engine: Engine, data: Iterator[dict[str, torch.Tensor]], job: JobConfig,
          logger: NullLogger, grad_accum: int, global_batch: int,
          plan: dict[str, Any] | None = None) -> list[float]:
    """Run `train.steps` optimizer steps; return the rank-averaged loss of each step.
    With the plan (plan.json) the log also compares measured memory and speed with it."""
    plan = plan or {}
    planned_peak_bytes = plan.get("memory", {}).get("peak_bytes")
    planned_total = plan.get("memory", {}).get("peak_total_bytes")
    flops_per_token = plan.get("compute", {}).get("flops_per_token")
    peak_flops = plan.get("compute", {}).get("peak_flops_per_device")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokens_per_step = global_batch * job.data.seq_len
    losses: list[float] = []
    probe = MemoryProbe(engine)
    for step in range(1, job.train.steps + 1):
        lr = lr_at(step, job.optim, job.train.steps)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        engine.probe = probe if step == job.debug.memory_probe_step else None
        if job.debug.crash_at_step == step and job.debug.crash_rank == rank:
            raise InjectedCrash(f"debug.crash_at_step={step} on rank {rank}")
        start = time.perf_counter()
        loss = engine.train_step([next(data) for _ in range(grad_accum)])
        dist.all_reduce(loss)  # also a barrier: the step time covers the slowest rank
        step_time = time.perf_counter() - start
        losses.append(loss.item() / world)
        extra = {}
        if engine.probe is not None and probe.moments:
            extra = _write_probe(job, rank, step, probe.moments, planned_peak_bytes)
        tps = tokens_per_step / step_time
        if extra or step % job.train.log_every == 0 or step == job.train.steps:
            model_metrics = _rank_mean(engine.step_metrics, world)  # only on logged steps
            peak_mem = peak_memory_bytes(engine.device)
            if peak_flops and flops_per_token:  # measured MFU against the GPU table's peak
                extra["mfu"] = tps * flops_per_token / (world * peak_flops)
            if planned_total and engine.device == "cuda":  # RSS on CPU is not comparable
                extra["peak_mem_planned_bytes"] = planned_total
                extra["peak_mem_error_pct"] = 100.0 * (peak_mem / planned_total - 1)
            logger.log(step, {"loss": losses[-1], "lr": lr, "tokens_per_s": tps,
                              "step_time_s": step_time, "peak_mem_bytes": peak_mem,
                              **model_metrics, **extra})
        logger.progress(step, losses[-1], tps)
    logger.summary({"final_loss": losses[-1]})
    return losses


def _rank_mean(metrics: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """The step's extra model metrics averaged over ranks (a collective when there are any;
    every rank has the same keys, since they run the same model)."""
    if not metrics:
        return {}
    values = torch.stack([metrics[k] for k in sorted(metrics)])
    dist.all_reduce(values)
    return {k: v / world for k, v in zip(sorted(metrics), values.tolist(), strict=True)}


def _write_probe(job: JobConfig, rank: int, step: int, moments: dict[str, dict[str, int]],
                 planned_peak_bytes: int | None) -> dict[str, float]:
    """Save this rank's measurement; return planned-vs-measured metrics for the log."""
    out = Path(job.run_dir) / "memory"
    out.mkdir(exist_ok=True)
    (out / f"rank{rank}.json").write_text(
        json.dumps({"rank": rank, "step": step, "moments": moments}, indent=2) + "\n")
    measured = max(m["total_bytes"] for m in moments.values())
    if not planned_peak_bytes:
        return {}
    return {"model_state_measured_bytes": measured,
            "model_state_planned_bytes": planned_peak_bytes,
            "model_state_error_pct": 100.0 * (measured / planned_peak_bytes - 1)}
