"""Rank-0 metrics: every step to `metrics.jsonl` and to W&B, plus a progress bar. Other ranks get
`NullLogger`, which has the same interface. Nothing else in the project talks to W&B.

`metrics.jsonl` only ever grows by whole lines: a record that cannot be written completely (disk
full, quota, file-size limit) is cut off again and the run stops with a one-line `WriteError`
(`DiskFull` when the device is out of space)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

from orchestrator.common.contract import WANDB_RUN_JSON
from orchestrator.common.errors import OrchestratorError
from orchestrator.common.secrets import redact
from orchestrator.config.load import to_dict
from orchestrator.config.schema import JobConfig
from orchestrator.run.wandb_run import WandbRun

RUN_INFO = WANDB_RUN_JSON
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class WriteError(OrchestratorError, OSError):
    """A run file could not be written (the environment, not a bug): one line naming the path,
    the reason and where the run stopped. Also an OSError carrying the original errno."""

    def __init__(self, message: str, code: int | None) -> None:
        OSError.__init__(self, code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class DiskFull(WriteError):
    """No space left on the device (or the quota is used up)."""


def write_error(path: str | os.PathLike[str], err: OSError, where: str) -> WriteError:
    """The one-line error for `err` raised while writing `path`; `where` says where the run
    stopped (e.g. "at step 7")."""
    if err.errno in NO_SPACE:
        reason = "no space left on device" if err.errno == errno.ENOSPC else "disk quota exceeded"
        return DiskFull(f"disk full writing {path} ({reason}); the run stopped {where}",
                        err.errno)
    reason = err.strerror or str(err) or type(err).__name__
    return WriteError(f"cannot write {path} ({reason}); the run stopped {where}", err.errno)


def append_whole(fd: int, data: bytes) -> None:
    """Append `data` to the O_APPEND file `fd` completely or not at all: on a failed or short
    write the file is cut back to its length before, so it still ends with a whole record."""
    start = os.fstat(fd).st_size
    view = memoryview(data)
    try:
        while view:
            n = os.write(fd, view)
            if n <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[n:]
    except OSError:
        with contextlib.suppress(OSError):  # e.g. /dev/full cannot be truncated
            os.ftruncate(fd, start)
        raise


class NullLogger:
    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def event(self, name: str, values: dict[str, Any]) -> None:
        pass

    def close(self, failed: bool = False, stopped: bool = False) -> None:
        pass

    def wandb_id(self) -> str | None:
        return None


class MetricsLogger(NullLogger):
    """`resume_step`: the run continues from that step's checkpoint: records of later steps
    (logged before the run stopped) are dropped, and the W&B run goes on under its id."""

    def __init__(self, job: JobConfig, resume_step: int | None = None) -> None:
        self.run_dir = Path(job.run_dir)
        self.path = self.run_dir / job.logging.metrics_file
        if resume_step is not None and self.path.exists():
            keep_until(self.path, resume_step)
        try:
            self.fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                                          0o644)
        except OSError as e:
            raise write_error(self.path, e, "before its first step") from e
        self.step = 0  # the last step logged, for the error message
        self.val_loss: float | None = None  # the last `val/loss` (eval.every_steps), if any
        self.bar = None
        if job.logging.progress and job.train.task == "pretrain":  # a bar of training steps
            from tqdm import tqdm

            self.bar = tqdm(total=job.train.steps, desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=True)
        # W&B starts in the background (wandb_run.py): the model build and the first steps
        # do not wait for it; wandb_run.json is written once it is up
        self.wandb: WandbRun | None = None
        self.info_written = False
        w = job.logging.wandb
        self.wandb_mode = w.mode
        if w.mode != "disabled":
            prior = self.run_dir / RUN_INFO
            resumed: dict[str, str] = {}
            if resume_step is not None and prior.exists():  # the same W&B run goes on
                resumed = {"id": json.loads(prior.read_text())["id"], "resume": "allow"}
            self.wandb = WandbRun(dict(
                mode=w.mode, dir=str(self.run_dir), project=w.project, entity=w.entity,
                name=w.name or self.run_dir.name, group=w.group, tags=list(w.tags),
                config=redact(to_dict(job)), **resumed))

    def _wandb_up(self, wait: bool = False) -> bool:
        """Whether the W&B run is up (with `wait`: once it is); writes wandb_run.json the first
        time it is."""
        if self.wandb is None or not (self.wandb.wait() if wait else self.wandb.ready()):
            return False
        if not self.info_written:
            self.info_written = True
            run = self.wandb.run
            info = {"id": run.id, "name": run.name, "mode": self.wandb_mode,
                    "dir": str(Path(run.dir).parent)}
            path = self.run_dir / RUN_INFO
            try:
                path.write_text(json.dumps(info, indent=2) + "\n")
            except OSError as e:
                raise write_error(path, e, f"at step {self.step}" if self.step
                                  else "before its first step") from e
        return True

    def wandb_id(self) -> str | None:
        """The W&B run's id (waits for it to be up); None without W&B."""
        return self.wandb.run.id if self._wandb_up(wait=True) and self.wandb else None

    def _append(self, record: dict[str, Any], where: str) -> None:
        assert self.fd is not None, "logger is closed"
        try:
            append_whole(self.fd, (json.dumps(record) + "\n").encode())
        except OSError as e:
            raise write_error(self.path, e, where) from e

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._append({"step": step, **metrics}, f"at step {step}")
        self.step = step
        self.val_loss = metrics.get("val/loss", self.val_loss)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
            self._wandb_up()

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            val = {} if self.val_loss is None else {"val_loss": f"{self.val_loss:.4f}"}
            self.bar.set_postfix(loss=f"{loss:.4f}", **val, tok_s=f"{tokens_per_s:,.0f}",
                                 refresh=False)
            self.bar.update(step - self.bar.n)  # called on logged steps only

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.update_summary(values)

    def event(self, name: str, values: dict[str, Any]) -> None:
        """A non-step record (e.g. where the ranks ran) in metrics.jsonl and the W&B summary."""
        after = f" after step {self.step}" if self.step else ""
        self._append({"event": name, **values}, f"at the '{name}' event{after}")
        self.summary(values)

    def close(self, failed: bool = False, stopped: bool = False) -> None:
        """`stopped`: the run stopped on a signal to be resumed (W&B shows it as preempted)."""
        if self.bar is not None:
            self.bar.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.wandb is not None:
            try:
                self._wandb_up(wait=True)
            except Exception:
                if failed:  # the run's own error is the one to report
                    return
                raise
            self.wandb.finish(exit_code=1 if failed else 0, preempting=stopped)


def make_logger(job: JobConfig, rank: int, resume_step: int | None = None) -> NullLogger:
    return MetricsLogger(job, resume_step) if rank == 0 else NullLogger()


def write_record(path: Path, record: dict[str, Any], where: str) -> None:
    """A result file (eval.json, quantize.json): `record` as indented JSON, or a one-line
    `WriteError` saying the run stopped `where`."""
    try:
        path.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as e:
        raise write_error(path, e, where) from e


def log_event(job: JobConfig, name: str, values: dict[str, Any]) -> None:
    """One event in metrics.jsonl and the W&B summary from a process that logs nothing else
    (evaluate, quantize): its own rank-0 logger, closed again."""
    logger = make_logger(job, 0)
    failed = True
    try:
        logger.event(name, values)
        failed = False
    finally:
        logger.close(failed=failed)


def keep_until(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl (atomically) without the step records after `step`; events and a
    cut-off last line's predecessors stay."""
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a record cut off when the run died
        if record.get("step", 0) <= step or "event" in record:
            kept.append(line if line.endswith("\n") else line + "\n")
    from orchestrator.common.files import write_atomic

    write_atomic(path, "".join(kept))
