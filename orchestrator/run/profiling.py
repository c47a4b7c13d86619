"""`train.profile`: torch.profiler over training steps `[first, last]` on every rank.

Each rank writes `<run_dir>/profile/rank<N>.json`, a Chrome trace (open it in Perfetto,
chrome://tracing or TensorBoard's profiler plugin) with the ops' input shapes and, with
`train.profile.memory`, the allocator's events (the trace viewers' memory view). On CUDA
`memory` also records the caching allocator's history over the same steps and writes
`profile/rank<N>.memory.pickle`, which PyTorch's memory visualiser (pytorch.org/memory_viz)
opens. With TensorBoard installed the trace is also linked as
`profile/tensorboard/rank<N>.pt.trace.json`, the layout its profiler plugin reads.

The step before `first` runs under the profiler too, unrecorded (torch.profiler's warm-up step:
the profiler's own start-up cost stays out of the recorded steps). The loop logs each step
under the profiler on its own, marked `profiled`, without tokens/s or MFU: throughput under a
profiler is not the run's (run/loop.py).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from orchestrator.common.contract import profile_trace
from orchestrator.config.schema import JobConfig


class StepProfiler:
    """Starts the profiler before the warm-up step, advances it after every step, and writes
    the trace (and the CUDA memory snapshot) after step `last`."""

    def __init__(self, job: JobConfig, rank: int, device: str, start_step: int) -> None:
        self.first, self.last = job.train.profile.steps
        self.first = max(self.first, start_step + 1)  # resumed inside the range: the rest
        self.memory, self.cuda = job.train.profile.memory, device == "cuda"
        self.trace = profile_trace(job.run_dir, rank)
        self.warmup = 1 if self.first - 1 > start_step else 0
        self.prof: profile | None = None
        self.done = self.first > self.last  # resumed after the range: nothing left to record

    def covers(self, step: int) -> bool:
        """Whether `step` runs under the profiler (its warm-up step or a recorded one): the loop
        logs it on its own, marked `profiled`, without tokens/s."""
        return not self.done and self.first - self.warmup <= step <= self.last

    def before(self, step: int) -> None:
        """At the start of `step`: the profiler starts before the warm-up step."""
        if self.done or step != self.first - self.warmup:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with warnings.catch_warnings():  # resumed at `first`: no step is left to warm up on
            warnings.filterwarnings("ignore", message="Profiler won't be using warmup")
            steps = schedule(wait=0, warmup=self.warmup, active=self.last - self.first + 1,
                             repeat=1)
        self.prof = profile(activities=activities, record_shapes=True,
                            profile_memory=self.memory, schedule=steps, on_trace_ready=self._write)
        if self.cuda and self.memory:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
        self.prof.start()

    def after(self, step: int) -> list[Path]:
        """At the end of `step`: advance the schedule; after `last`, stop and return the files
        written (the trace, and the memory snapshot on CUDA)."""
        if self.prof is None:
            return []
        if self.cuda:
            torch.cuda.synchronize()  # the step's kernels end inside the recorded window
        self.prof.step()
        if step < self.last:
            return []
        self.prof.stop()
        self.prof, self.done = None, True
        written = [self.trace]
        if self.cuda and self.memory:
            snapshot = self.trace.with_suffix(".memory.pickle")
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            written.append(snapshot)
        return written

    def _write(self, prof: profile) -> None:
        self.trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.trace))
        if importlib.util.find_spec("tensorboard") is not None:
            board = self.trace.parent / "tensorboard" / f"{self.trace.stem}.pt.trace.json"
            board.parent.mkdir(exist_ok=True)
            board.unlink(missing_ok=True)
            os.link(self.trace, board)  # the same file, named as the plugin looks for it


class NoProfiler:
    """Without `train.profile.steps`: no step runs under a profiler."""

    def covers(self, step: int) -> bool:
        return False

    def before(self, step: int) -> None:
        pass

    def after(self, step: int) -> list[Path]:
        return []


def make_profiler(job: JobConfig, rank: int, device: str,
                  start_step: int) -> StepProfiler | NoProfiler:
    """The run's profiler (`NoProfiler` without `train.profile.steps`). A run resumed after the
    range says so once (rank 0): those steps were recorded, or not, by the earlier attempt."""
    if not job.train.profile.steps:
        return NoProfiler()
    profiler = StepProfiler(job, rank, device, start_step)
    if profiler.done and rank == 0:
        print(f"train.profile.steps={list(job.train.profile.steps)}: resumed after step "
              f"{start_step}, past the profiled steps; nothing is profiled in this attempt",
              flush=True)
    return profiler
