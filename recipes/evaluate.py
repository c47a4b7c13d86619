"""Evaluate a model on held-out data under the configured strategy: loss, perplexity and
token accuracy (for masked LMs: accuracy on the masked positions).

`python -m orchestrator +recipe=evaluate model.pretrained_path=<run_dir>/model` — writes
`<run_dir>/eval.json`. Held-out data: the last `eval.holdout` share of the dataset, which
pre-training with the same `eval.holdout` never sees.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from orchestrator.config.load import load_job
from orchestrator.config.schema import JobConfig
from orchestrator.data import objective_of, train_and_held_out
from orchestrator.quantization.int8 import job_method
from orchestrator.run.distributed import RankInfo
from orchestrator.run.evaluation import eval_mode, held_out_sums, summarize
from orchestrator.run.metrics import log_event, write_record
from orchestrator.run.quantized import run_inference  # quantized models: one process
from orchestrator.run.rank_main import run_rank
from orchestrator.run.strategies.base import Engine


def run(config_path: str) -> None:
    job = load_job(config_path)
    run_inference(job, lambda engine, info: evaluate(job, engine, info))


def main(argv: list[str]) -> int:
    return run_rank(lambda: run(argv[1]))


def evaluate(job: JobConfig, engine: Engine, info: RankInfo) -> None:
    _, held_out = train_and_held_out(job)
    with eval_mode(engine.model):
        total = held_out_sums(engine, held_out, job, info.rank, info.world_size)
    method = job_method(job)
    result = {"objective": objective_of(job), **summarize(total),
              "model": job.model.pretrained_path, **({"quantized": method} if method else {})}
    if info.rank == 0:
        write_record(Path(job.run_dir) / "eval.json", result, "after evaluating")
        log_event(job, "eval", result)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
