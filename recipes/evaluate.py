"""Evaluate a model on held-out data under the configured strategy: loss, perplexity and
token accuracy (for masked LMs: accuracy on the masked positions).

`python -m orchestrator +recipe=evaluate model.pretrained_path=<run_dir>/model` — writes
`<run_dir>/eval.json`. Held-out data: the last `eval.holdout` share of the dataset, which
pre-training with the same `eval.holdout` never sees.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from orchestrator.data import build_dataset, make_collate, objective_of, split
from orchestrator.distributed import RankInfo
from orchestrator.metrics import make_logger, write_error
from orchestrator.rank_main import run_rank
from orchestrator.schema import JobConfig
from orchestrator.strategies import run_inference
from orchestrator.strategies.base import Engine
from orchestrator.typed import load_job


def run(config_path: str) -> None:
    job = load_job(config_path)
    run_inference(job, lambda engine, info: evaluate(job, engine, info))


def main(argv: list[str]) -> int:
    return run_rank(lambda: run(argv[1]))


def evaluate(job: JobConfig, engine: Engine, info: RankInfo) -> None:
    _, held_out = split(build_dataset(job), job.eval.holdout)
    sampler = DistributedSampler(held_out, info.world_size, info.rank, shuffle=False)
    loader = DataLoader(held_out, batch_size=job.train.micro_batch_size, sampler=sampler,
                        collate_fn=make_collate(job, info.rank))
    total = torch.zeros(3, device=engine.device)
    for i, batch in enumerate(loader):
        if i >= job.eval.max_batches:
            break
        total += engine.eval_step(batch, shift=objective_of(job) == "causal")
    dist.all_reduce(total)
    loss_sum, tokens, correct = total.tolist()
    result = {"objective": objective_of(job), "loss": loss_sum / tokens,
              "perplexity": math.exp(loss_sum / tokens), "accuracy": correct / tokens,
              "tokens": int(tokens), "model": job.model.pretrained_path}
    if info.rank == 0:
        out = Path(job.run_dir) / "eval.json"
        try:
            out.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as e:
            raise write_error(out, e, "after evaluating") from e
        logger = make_logger(job, 0)
        failed = True
        try:
            logger.event("eval", result)
            failed = False
        finally:
            logger.close(failed=failed)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
