"""The one training loop: LR schedule, data, engine steps, metrics, memory probe."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from orchestrator.common.contract import memory_file
from orchestrator.common.plan import Plan
from orchestrator.config.schema import JobConfig, OptimConfig
from orchestrator.run.checkpoint.stop import Stopped, StopRequest
from orchestrator.run.metrics import NullLogger
from orchestrator.run.profiling import NoProfiler, StepProfiler
from orchestrator.run.strategies.base import Engine


class InjectedCrash(RuntimeError):
    """Raised by `debug.crash_at_step` to exercise the failure path."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite (`train.stop_on_nonfinite`): its message is one line."""


def check_finite(step_losses: list[float], last_step: int) -> None:
    """Raise `NonFiniteLoss` naming the first step of the interval ending at `last_step` whose
    (all-reduced, so identical on every rank) loss is NaN or infinite."""
    first = last_step - len(step_losses) + 1
    for step, value in enumerate(step_losses, first):
        if not math.isfinite(value):
            raise NonFiniteLoss(f"loss became {value} at step {step} (train.stop_on_nonfinite="
                                "true; lower optim.lr or check the data)")


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` (or constant)."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / max(1, cfg.warmup_steps)
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def device_sync(device: str) -> None:
    """Wait until the device has finished all queued work (CUDA kernels and NCCL collectives
    return to the host as soon as they are queued; CPU work is already done)."""
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device: str) -> None:
    """Start a new peak-memory window: CUDA's allocator peak, or on Linux the process's peak
    resident set (VmHWM, reset by writing 5 to /proc/self/clear_refs)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes(device: str) -> int:
    """The peak since the last `reset_peak_memory`: CUDA max allocated, or the peak RSS."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class IntervalTimer:
    """Wall time of the steps since the last logged step. `close` first waits for the device
    (`sync`), so queued GPU work and collectives are counted in the steps that issued them, and
    the interval runs from one close to the next, so logging itself is counted too."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.start = time.perf_counter()
        self.steps = 0

    def tick(self) -> None:
        self.steps += 1

    def close(self) -> tuple[float, int]:
        """(seconds, steps) since the last close; starts the next interval."""
        self.sync()
        now = time.perf_counter()
        out = (now - self.start, self.steps)
        self.start, self.steps = now, 0
        return out

    def restart(self) -> None:
        """Start the interval anew (after waiting for the device): the time since the last
        close (held-out evaluation) counts for no step."""
        self.sync()
        self.start = time.perf_counter()


class MemoryProbe:
    """Records this rank's model-state bytes at each probed moment of one step."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.moments: dict[str, dict[str, int]] = {}

    def __call__(self, moment: str) -> None:
        measured = self.engine.model_state_bytes()
        measured["total_bytes"] = sum(measured.values())
        self.moments[moment] = measured


@dataclass
class Training:
    """What the loop runs with: the engine, the job, the rank's logger, the batch arithmetic,
    and what the recipe plugs in (all optional). `checkpoint(step)` is called every
    `checkpoint.every_steps` and after the last step; `evaluate()` (a collective returning e.g.
    `val/loss`) every `eval.every_steps`; `poll()` on every logged step (the checkpointer
    commits background saves there); with `stop` (and `checkpoint`) the ranks agree after every
    step whether one got the stop signal. With the plan, the log also compares measured memory
    and speed with it."""

    engine: Engine
    job: JobConfig
    logger: NullLogger
    grad_accum: int
    global_batch: int
    plan: Plan | None = None
    start_step: int = 0  # a resumed run starts after its checkpoint's step
    checkpoint: Callable[[int], Path] | None = None
    stop: StopRequest | None = None
    poll: Callable[[], None] | None = None
    evaluate: Callable[[], dict[str, float]] | None = None
    profiler: StepProfiler | NoProfiler = field(default_factory=NoProfiler)  # train.profile


@dataclass
class _Interval:
    """The steps since the last logged one: their losses, still on the device, and timer."""

    timer: IntervalTimer
    pending: list[torch.Tensor] = field(default_factory=list)


def train(run: Training, data: Iterator[dict[str, torch.Tensor]]) -> list[float]:
    """Run optimizer steps `start_step + 1 .. train.steps`; return the rank-averaged loss of
    each. Checkpoint, evaluation and stop steps are logged steps too; evaluation's time counts
    in no step's time or tokens/s, nor its memory in any interval's peak. A stop raises
    `Stopped` on every rank after that step's checkpoint.

    The host waits for the device only on logged steps (every `train.log_every`, the memory
    probe's step and the last): the losses of the interval are all-reduced in one collective,
    and time, tokens/s and peak memory cover the whole interval. With `train.stop_on_nonfinite`
    a NaN or infinite loss raises `NonFiniteLoss` there, on every rank alike.

    With compiled blocks (`train.compile`) the first batch is run once before the first step
    (`Engine.warm_up`, which keeps nothing of it) and the time that took is logged as the
    `compile` event's `compile_s`: compilation counts in no step's time or tokens/s."""
    engine, job = run.engine, run.job
    if engine.compiled_blocks and run.start_step < job.train.steps:
        data = _warm_up(engine, data, run.logger)
    losses: list[float] = []
    probe = MemoryProbe(engine)
    reset_peak_memory(engine.device)  # set-up (model build, sharding) is not a step's peak
    interval = _Interval(IntervalTimer(lambda: device_sync(engine.device)))
    every = job.checkpoint.every_steps if run.checkpoint is not None else 0
    eval_every = job.eval.every_steps if run.evaluate is not None else 0
    for step in range(run.start_step + 1, job.train.steps + 1):
        lr = lr_at(step, job.optim, job.train.steps)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        engine.probe = probe if step == job.debug.memory_probe_step else None
        engine.step = step
        if job.debug.crash_at_step == step and job.debug.crash_rank == dist.get_rank():
            _crash(job, step, dist.get_rank())
        run.profiler.before(step)
        interval.pending.append(engine.train_step([next(data) for _ in range(run.grad_accum)]))
        if job.debug.step_delay_s:
            time.sleep(job.debug.step_delay_s)
        interval.timer.tick()
        extra = {}
        if engine.probe is not None and probe.moments:
            extra = _write_probe(job, dist.get_rank(), step, probe.moments, run.plan)
        stopping = (run.stop is not None and run.checkpoint is not None
                    and step < job.train.steps and run.stop.agreed())
        save = stopping or (every > 0 and (step % every == 0 or step == job.train.steps))
        evaluating = eval_every > 0 and step % eval_every == 0
        # a step under the profiler is an interval of its own, and so is the one before
        profiled = run.profiler.covers(step)
        bounds = profiled or run.profiler.covers(step + 1)
        if (extra or save or evaluating or bounds or step % job.train.log_every == 0
                or step == job.train.steps):
            _log_interval(run, interval, step, lr, losses, extra, evaluating, profiled)
            if save and run.checkpoint is not None:
                saved = run.checkpoint(step)
                if stopping and run.stop is not None:
                    run.stop.close()
                    raise Stopped(run.stop.name, step, str(saved))
        written = run.profiler.after(step)
        if written:
            run.logger.event("profile", {"steps": list(job.train.profile.steps),
                                         "dir": str(written[0].parent)})
    if run.stop is not None:
        run.stop.close()  # the last vote, still in flight
    if losses:
        run.logger.summary({"final_loss": losses[-1]})
    return losses


def _log_interval(run: Training, interval: _Interval, step: int, lr: float,
                  losses: list[float], extra: dict[str, float], evaluating: bool,
                  profiled: bool = False) -> None:
    """A logged step: the interval's losses all-reduced in one collective (appended to
    `losses`), its time, tokens/s and peak memory, the model's own metrics, MFU and memory
    against the plan, and the evaluation (measured after the interval: not part of it). A
    step under the profiler is marked `profiled` and has no tokens/s or MFU."""
    engine, job, world = run.engine, run.job, dist.get_world_size()
    step_losses = torch.stack(interval.pending)
    dist.all_reduce(step_losses)  # one collective for the interval, not one per step
    elapsed, steps = interval.timer.close()
    losses.extend(v / world for v in step_losses.tolist())
    if job.train.stop_on_nonfinite:  # every rank sees the same sums: all stop together
        check_finite(losses[-len(interval.pending):], step)
    interval.pending = []
    step_time = elapsed / steps
    tps = run.global_batch * job.data.seq_len / step_time
    model_metrics = _rank_mean(engine.step_metrics, world)  # only on logged steps
    model_metrics.update(engine.precision_metrics())  # fp16: loss scale, skipped steps
    peak_mem = peak_memory_bytes(engine.device)
    extra = {**extra, **_against_plan(run.plan, engine.device, tps, world, peak_mem)}
    if evaluating and run.evaluate is not None:  # measured above: not this interval's
        extra.update(run.evaluate())
        interval.timer.restart()
    record = {"loss": losses[-1], "lr": lr, "tokens_per_s": tps, "step_time_s": step_time,
              "peak_mem_bytes": peak_mem, **model_metrics, **extra}
    if profiled:  # throughput under a profiler is not the run's
        record = {k: v for k, v in record.items() if k not in ("tokens_per_s", "mfu")}
        record["profiled"] = 1
    run.logger.log(step, record)
    run.logger.progress(step, losses[-1], tps)
    reset_peak_memory(engine.device)  # the next interval's peak is its own
    if run.poll is not None:
        run.poll()


def _against_plan(plan: Plan | None, device: str, tps: float, world: int,
                  peak_mem: int) -> dict[str, float]:
    """Measured MFU against the GPU table's peak, and (on CUDA: RSS on CPU is not comparable)
    the device peak against the plan's, without its stated allowance for fragmentation."""
    if plan is None:
        return {}
    out = {}
    c, m = plan.compute, plan.memory
    if c.peak_flops_per_device and c.flops_per_token:
        out["mfu"] = tps * c.flops_per_token / (world * c.peak_flops_per_device)
    planned_total = (m.peak_total_bytes or 0) - m.overhead_bytes
    if planned_total > 0 and device == "cuda":
        out["peak_mem_planned_bytes"] = planned_total
        out["peak_mem_error_pct"] = 100.0 * (peak_mem / planned_total - 1)
    return out


def _warm_up(engine: Engine, data: Iterator[dict[str, torch.Tensor]],
             logger: NullLogger) -> Iterator[dict[str, torch.Tensor]]:
    """Compile before the first step on its first micro batch; log the `compile` event
    (`compile_s`: the warm-up's wall time, i.e. compilation plus one forward and backward;
    `compiled_blocks`; `compiled_graphs`: dynamo's graphs in this rank, 0 if nothing was
    compiled). Returns the stream with that batch put back in front."""
    from orchestrator.transforms.compile import compiled_graphs

    first = next(data)
    began = time.perf_counter()
    engine.warm_up(first)
    device_sync(engine.device)
    compile_s = time.perf_counter() - began
    logger.event("compile", {"compiled_blocks": engine.compiled_blocks,
                             "compiled_graphs": compiled_graphs(),
                             "compile_s": round(compile_s, 3)})
    return itertools.chain([first], data)


def _crash(job: JobConfig, step: int, rank: int) -> None:
    """`debug.crash_at_step`, in the job's first attempt only (a torchrun restart resumes)."""
    import os
    import signal

    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if job.debug.crash_mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedCrash(f"debug.crash_at_step={step} on rank {rank}")


def _rank_mean(metrics: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """The step's extra model metrics averaged over ranks (a collective when there are any;
    every rank has the same keys, since they run the same model)."""
    if not metrics:
        return {}
    values = torch.stack([metrics[k] for k in sorted(metrics)])
    dist.all_reduce(values)
    return {k: v / world for k, v in zip(sorted(metrics), values.tolist(), strict=True)}


def _write_probe(job: JobConfig, rank: int, step: int, moments: dict[str, dict[str, int]],
                 plan: Plan | None) -> dict[str, float]:
    """Save this rank's measurement; return planned-vs-measured metrics for the log."""
    out = memory_file(job.run_dir, rank)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rank": rank, "step": step, "moments": moments}, indent=2) + "\n")
    measured = max(m["total_bytes"] for m in moments.values())
    planned_peak_bytes = plan.memory.peak_bytes if plan is not None else None
    if not planned_peak_bytes:
        return {}
    return {"model_state_measured_bytes": measured,
            "model_state_planned_bytes": planned_peak_bytes,
            "model_state_error_pct": 100.0 * (measured / planned_peak_bytes - 1)}
