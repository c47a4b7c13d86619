"""Pre-train a causal LM under the configured strategy (one process per rank).

Run by the launcher as `python -m recipes.pretrain <run_dir>/config.yaml`; users start it with
`python -m orchestrator +recipe=<bundle>`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from orchestrator.common.attempt import take_attempt
from orchestrator.common.contract import CONFIG_SHA_ENV, DEVICE_ENV, PLAN_JSON
from orchestrator.common.plan import read_plan
from orchestrator.config import resume
from orchestrator.config.derived import data_parallel_rank, data_parallel_size, resolve_batch
from orchestrator.config.load import load_job
from orchestrator.data import batches, tokenizer_file, train_and_held_out, uses_bpe
from orchestrator.run import distributed, evaluation, loop
from orchestrator.run.checkpoint import periodic, stop
from orchestrator.run.checkpoint.final import save_final
from orchestrator.run.metrics import make_logger
from orchestrator.run.profiling import make_profiler
from orchestrator.run.rank_main import run_rank
from orchestrator.run.setup import build_for_rank
from orchestrator.run.setup import setup as setup_strategy


class PretrainRecipe:
    def __init__(self, config_path: str) -> None:
        self.job = load_job(config_path)
        self.plan = read_plan(Path(config_path).parent / PLAN_JSON)

    def setup(self) -> None:
        self.stop = stop.StopRequest(self.job)  # from here on the stop signal means a checkpoint
        if os.environ.get("RANK", "0") == "0":
            take_attempt(self.job.run_dir)  # the previous attempt's record
        device = os.environ.get(DEVICE_ENV, "cpu")
        self.info = distributed.init(device, self.job.dist.timeout_s)
        self.resume = resume.to_resume(self.job)  # every rank reads the same directory
        # before the model build: W&B starts in the background meanwhile (rank 0)
        self.logger = make_logger(self.job, self.info.rank,
                                  self.resume.step if self.resume is not None else None)
        model = build_for_rank(self.job, self.info)
        self.engine = setup_strategy(model, self.job, device)
        start, load_s = 0, None
        if self.resume is not None:
            began = time.perf_counter()
            periodic.load(self.engine, self.resume)
            load_s = round(time.perf_counter() - began, 3)
            start = self.resume.step
            if self.info.rank == 0:
                print(f"resumed from {self.resume.path} (step {start})", flush=True)
        self.start_step = start
        accum, _ = resolve_batch(self.job)
        # the held-out share is never trained on; eval.every_steps evaluates on it (or on
        # eval.path)
        dataset, self.held_out = train_and_held_out(self.job)
        # the stream is a pure function of (seed, rank, micro-batch index): continue it
        # over the data-parallel ranks only: a tensor-parallel group computes on one batch
        self.data = batches(dataset, self.job, data_parallel_rank(self.job, self.info.rank),
                            data_parallel_size(self.job), start_step=start * accum)
        # the set-up peak (model build + sharding) per rank: with meta-device init only rank 0
        # ever holds the whole model
        ranks = distributed.gather((distributed.node_name(), loop.peak_memory_bytes(device)))
        self.logger.event("start", {"world_size": self.info.world_size,
                                    "nodes": [node for node, _ in ranks], "device": device,
                                    "setup_peak_mem_bytes": [peak for _, peak in ranks],
                                    **({"resumed_step": start, "load_s": load_s,
                                        "changed": resume.changes(self.job, self.resume)}
                                       if self.resume is not None else {})})
        self.saver = periodic.Saver(self.engine, self.job, self.committed)

    def train(self) -> list[float]:
        accum, global_batch = resolve_batch(self.job)
        try:
            run = loop.Training(self.engine, self.job, self.logger, accum, global_batch,
                                self.plan, self.start_step, checkpoint=self.checkpoint,
                                stop=self.stop, poll=self.saver.poll,
                                evaluate=self.evaluate if self.job.eval.every_steps else None,
                                profiler=make_profiler(self.job, self.info.rank,
                                                       self.engine.device, self.start_step))
            losses = loop.train(run, self.data)
            self.saver.close()  # the last checkpoint, when written in the background
        except stop.Stopped as stopped:
            self.saver.close()
            if self.info.rank == 0:
                stop.record(self.job, stopped, stopped.step)
                print(f"orchestrator: {stopped}", flush=True)
            # no rank exits before the record is written: under Slurm the first node whose
            # torchrun exits makes srun end the others
            dist.barrier()
            raise
        bpe = tokenizer_file(self.job) if uses_bpe(self.job) else None
        if self.job.precision.qat != "none":  # convert to int8, measure, save that
            from orchestrator.run.quantized import finish_qat as finish
            from recipes.quantize import summary

            report = finish(self.engine, self.job, self.info, self.held_out, self.logger, bpe)
            if report is not None:
                print(summary(report), flush=True)
        elif self.job.train.save_model:
            saved = save_final(self.engine, self.job.run_dir, self.info.rank, bpe)
            if saved is not None:
                print(f"model saved to {saved}", flush=True)
        if self.info.rank == 0:
            stop.record(self.job, None, self.job.train.steps)
        return losses

    def evaluate(self) -> dict[str, float]:
        """`eval.every_steps`: `val/loss`, `val/perplexity` and `val/accuracy` on the held-out
        share (a collective; the training that follows is unaffected)."""
        return evaluation.evaluate_during_training(self.engine, self.held_out, self.job,
                                                   self.info.rank, self.info.world_size)

    def checkpoint(self, step: int) -> Path:
        meta = {"config_sha256": os.environ.get(CONFIG_SHA_ENV),
                "global_batch_size": resolve_batch(self.job)[1],
                "wandb_id": self.logger.wandb_id()}  # rank 0's counts: it writes meta.json
        return self.saver.save(step, meta)

    def committed(self, info: dict[str, Any]) -> None:
        """A checkpoint counts from now on: log where, and how long the loop waited for it
        (`blocked_s`; all of `save_s` unless it was written in the background)."""
        self.logger.event("checkpoint", {k: info[k] for k in ("step", "path", "save_s",
                                                              "blocked_s")})

    def cleanup(self, failed: bool = False, stopped: bool = False) -> None:
        logger = getattr(self, "logger", None)
        if logger is not None:
            logger.close(failed=failed, stopped=stopped)
        # Drop every holder of the process group (DDP reducer, device mesh) before destroying
        # it: a gloo group freed during interpreter shutdown can abort the process.
        self.engine = self.data = None
        distributed.shutdown()


def run(config_path: str) -> None:
    recipe = PretrainRecipe(config_path)
    failed, stopped = True, False
    try:
        recipe.setup()
        recipe.train()
        failed = False
    except stop.Stopped:
        failed, stopped = False, True
        raise
    finally:
        recipe.cleanup(failed=failed, stopped=stopped)


def main(argv: list[str]) -> int:
    return run_rank(lambda: run(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
