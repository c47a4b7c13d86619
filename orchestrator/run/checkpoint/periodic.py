"""Periodic training checkpoints: saved sharded by every rank, committed atomically, pruned, and
found again to resume from.

Layout: `<run_dir>/checkpoints/step-00000012/` holds the engine's state (written by
`Engine.save_checkpoint`: torch.distributed.checkpoint shards for torch strategies), one
`rank<r>.pt` per rank (RNG states, loss scaler) and `meta.json`. A checkpoint is written under
`.step-00000012.tmp` and renamed into place by rank 0 after every rank finished, so a directory
named `step-*` is always complete; a crash mid-save leaves the previous one the newest.
Loading uses torch.distributed.checkpoint or `torch.load(weights_only=True)`: no pickle code
runs from a checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from orchestrator.common.checkpoints import (
    CONFIG,
    META,
    PREFIX,
    ROOT,
    CheckpointError,
    Resume,
    complete,
    step_name,
)
from orchestrator.config.schema import JobConfig
from orchestrator.run.strategies.base import Engine


def _rank_state(engine: Engine) -> dict[str, Any]:
    state: dict[str, Any] = {"torch_rng": torch.get_rng_state(),
                             "python_rng": random.getstate()}
    if torch.cuda.is_available() and engine.device == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state()
    if engine.scaler is not None:
        state["scaler"] = engine.scaler.state_dict()
    return state


def _set_rank_state(engine: Engine, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if "cuda_rng" in state and engine.device == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"])
    if engine.scaler is not None and "scaler" in state:
        engine.scaler.load_state_dict(state["scaler"])


@dataclass
class _Pending:
    """A save whose files are still being written in the background."""
    step: int
    tmp: Path
    final: Path
    meta: dict[str, Any]
    started: float
    blocked_s: float
    future: Any  # the files written (DCP's upload), or None for a synchronous save
    staged: Any = None  # the state copied to host memory (async staging), until awaited

    def wait(self, future: Any) -> None:
        """The loop waits for `future` (the copy or the files): that time counts as blocked."""
        began = time.perf_counter()
        future.result()
        self.blocked_s += time.perf_counter() - began


class Saver:
    """Every rank: writes checkpoints; rank 0 commits each once every rank's files are there,
    and prunes old ones. With `checkpoint.async_save` the files are written in the background
    (DCP's async_save) and committed at the first `poll` that finds every rank done (or at the
    next `save`, or `finish`); a run that dies first leaves only the `.tmp` directory, which
    never counts.

    The copy of the state into host memory (staging) runs in the background too, during the
    next step's forward and backward: an optimizer step pre-hook waits for it before the
    weights and optimizer state change. The loop's blocked time (`blocked_s`) is the time in
    `save` plus that wait, plus any wait for the files (a save still being written when the
    next is due, or at the end of the run)."""

    def __init__(self, engine: Engine, job: JobConfig,
                 on_commit: Callable[[dict[str, Any]], None]) -> None:
        self.engine, self.job, self.on_commit = engine, job, on_commit
        self.pending: _Pending | None = None
        if dist.get_rank() == 0:  # saves cut short in an earlier attempt
            for left in (Path(job.run_dir) / ROOT).glob(f".{PREFIX}*.tmp"):
                shutil.rmtree(left, ignore_errors=True)
        dist.barrier()
        self.group = self.stager = None
        if job.checkpoint.async_save:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            # DCP's background collectives get a gloo group of their own: never interleaved
            # with the training step's on the default group
            self.group = dist.new_group(backend="gloo")
            # one host copy of this rank's state, re-used by every save, copied before the
            # loop goes on (the next step must not change what is being written); from a GPU
            # into pinned memory
            cuda = engine.device == "cuda"
            self.stager = DefaultStager(StagingOptions(use_pinned_memory=cuda,
                                                       use_shared_memory=False,
                                                       use_async_staging=True,
                                                       use_non_blocking_copy=cuda))
            engine.local_optimizer().register_step_pre_hook(self._wait_staged)

    def save(self, step: int, meta: dict[str, Any]) -> Path:
        """Write this step's checkpoint (the previous background one is committed first);
        returns the directory it is (or will be, once committed) at. The commit's meta.json
        adds `blocked_s`, how long the training loop waited for this call."""
        self.finish()
        rank = dist.get_rank()
        root = Path(self.job.run_dir) / ROOT
        final, tmp = root / step_name(step), root / f".{step_name(step)}.tmp"
        started = time.perf_counter()
        tmp.mkdir(parents=True, exist_ok=True)  # no barrier: left-overs went in __init__
        future = staged = None
        if self.group is not None:
            response = self.engine.async_save_checkpoint(tmp, self.group, self.stager)
            future, staged = response.upload_completion, response.staging_completion
        else:
            self.engine.save_checkpoint(tmp)
        torch.save(_rank_state(self.engine), tmp / f"rank{rank}.pt")
        blocked = time.perf_counter() - started
        self.pending = _Pending(step, tmp, final, meta, started, blocked, future, staged)
        if future is None:
            self.finish()
        return final

    def _wait_staged(self, *_: Any) -> None:
        """Before an optimizer step: the background copy of the saved state must be complete
        (the step changes what it copies); the wait counts as blocked."""
        pending = self.pending
        if pending is None or pending.staged is None:
            return
        pending.wait(pending.staged)
        pending.staged = None

    def poll(self) -> None:
        """Every rank, at the same step: commit the background save once every rank's files
        are written (one tiny all-reduce; the loop calls it on logged steps, where it waits
        for the device anyway)."""
        if self.pending is None or self.pending.future is None:
            return
        writing = torch.tensor([0 if self.pending.future.done() else 1],
                               device=self.engine.device)
        dist.all_reduce(writing, op=dist.ReduceOp.MAX)
        if not writing.item():
            self.finish()

    def close(self) -> None:
        """Every rank, at the end: commit what is pending and free the host copy."""
        self.finish()
        if self.stager is not None:
            self.stager.close()
            self.stager = None

    def finish(self) -> None:
        """Every rank: wait for the pending save, commit it, and pass its meta.json to
        `on_commit`."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        if pending.future is not None:  # the loop waits for it here (after the last step,
            pending.wait(pending.future)  # or when the next save is due): blocked too
        dist.barrier()  # every rank's files are written
        info = {"step": pending.step, "world_size": dist.get_world_size(),
                "strategy": [self.job.parallelism.backend, self.job.parallelism.zero_stage],
                "save_s": round(time.perf_counter() - pending.started, 3),
                "blocked_s": round(pending.blocked_s, 3), **pending.meta}
        if dist.get_rank() == 0:
            _commit(self.job, pending.tmp, pending.final, info)
        dist.barrier()
        self.on_commit({"path": str(pending.final), **info})


def _commit(job: JobConfig, tmp: Path, final: Path, info: dict[str, Any]) -> None:
    """Rank 0: the config and meta.json (listing every file's size) into `tmp`, then the
    rename that makes it count; then prune to `checkpoint.keep_last`."""
    shutil.copy(Path(job.run_dir) / CONFIG, tmp / CONFIG)  # what the run was
    info["files"] = {str(f.relative_to(tmp)): f.stat().st_size
                     for f in sorted(tmp.rglob("*")) if f.is_file()}
    (tmp / META).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)  # a re-run of this step after a restart
    tmp.rename(final)  # the commit
    for old in complete(job.run_dir)[:-job.checkpoint.keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load(engine: Engine, resume: Resume) -> None:
    """Every rank: restore the engine's state and this rank's RNG states from `resume`."""
    try:
        engine.load_checkpoint(resume.path)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"cannot load checkpoint {resume.path}: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                              ) from None
    own = resume.path / f"rank{dist.get_rank()}.pt"
    if own.is_file():  # at another world size, new ranks keep their seeded RNG
        try:
            state = torch.load(own, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling refusal is a bad file
            raise CheckpointError(f"cannot load {own}: {str(e).splitlines()[0]}") from None
        _set_rank_state(engine, state)


