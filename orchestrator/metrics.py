"""Rank-0 metrics: every step to `metrics.jsonl` and to W&B, plus a progress bar. Other ranks get
`NullLogger`, which has the same interface. Nothing else in the project talks to W&B."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from orchestrator.redact import redact
from orchestrator.schema import JobConfig
from orchestrator.typed import to_dict

RUN_INFO = "wandb_run.json"


class NullLogger:
    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def event(self, name: str, values: dict[str, Any]) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


class MetricsLogger(NullLogger):
    def __init__(self, job: JobConfig) -> None:
        self.run_dir = Path(job.run_dir)
        self.file = open(self.run_dir / job.logging.metrics_file, "a")  # noqa: SIM115
        self.bar = None
        if job.logging.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=job.train.steps, desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=True)
        self.wandb_run = None
        w = job.logging.wandb
        if w.mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                mode=w.mode, dir=str(self.run_dir), project=w.project, entity=w.entity,
                name=w.name or self.run_dir.name, group=w.group, tags=list(w.tags),
                config=redact(to_dict(job)), settings=wandb.Settings(console="off"),
            )
            info = {"id": self.wandb_run.id, "name": self.wandb_run.name, "mode": w.mode,
                    "dir": str(Path(self.wandb_run.dir).parent)}
            (self.run_dir / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self.bar.update(step - self.bar.n)  # called on logged steps only

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(values)

    def event(self, name: str, values: dict[str, Any]) -> None:
        """A non-step record (e.g. where the ranks ran) in metrics.jsonl and the W&B summary."""
        self.file.write(json.dumps({"event": name, **values}) + "\n")
        self.file.flush()
        self.summary(values)

    def close(self, failed: bool = False) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)


def make_logger(job: JobConfig, rank: int) -> NullLogger:
    return MetricsLogger(job) if rank == 0 else NullLogger()


def read_metrics(path: str | os.PathLike[str], events: bool = False) -> list[dict[str, Any]]:
    """The per-step records of metrics.jsonl (with `events=True`: the event records)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if ("event" in r) == events]


def read_wandb_run(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a run's offline W&B transaction log, read by W&B's own reader
    (`wandb leet inspect --json`)."""
    info = json.loads((Path(run_dir) / RUN_INFO).read_text())
    wandb_bin = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb_bin), "leet", "inspect", "--json", info["dir"]],
                         capture_output=True, text=True, check=True, timeout=120)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
