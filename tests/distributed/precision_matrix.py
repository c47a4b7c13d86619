"""One rank of the precision × strategy matrix (issue 15), run under torchrun by
tests/distributed/test_precision_matrix.py: every pair is validated as the launcher would, then
the accepted ones train a few steps here, in one process group, with the project's own model
build, strategy set-up and training loop. Sharing the process group keeps the real trainings
within the CI budget: 52 pairs, of which 29 train on a CPU without oneDNN fp16 and 35 on one
with it (DeepSpeed's fp16 pairs), in one torchrun start instead of one each.

    torchrun --nproc-per-node 2 tests/distributed/precision_matrix.py OUT.json PAIRS.json

Per pair rank 0 writes: rejected (the one-line reason) or the per-step losses, the dtype of a
transformer block's attention output and of the LM head's logits in the first forward (hooks),
and the loss scaler's metrics in the last record of the pair's metrics.jsonl.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_module

from orchestrator.cli import compose_job
from orchestrator.common.contract import DEEPSPEED_JSON
from orchestrator.common.errors import ConfigError
from orchestrator.common.records import read_metrics
from orchestrator.config.derived import Hardware, resolve_batch
from orchestrator.data import batches, train_and_held_out
from orchestrator.planning.plan import make_plan
from orchestrator.planning.preflight import validate
from orchestrator.run import distributed, loop
from orchestrator.run.metrics import make_logger
from orchestrator.run.setup import build_for_rank
from orchestrator.run.setup import setup as setup_strategy

STEPS = 6
COMMON = ["model=gpt2_tiny", f"train.steps={STEPS}", "optim.warmup_steps=1", "logging=none",
          "logging.progress=false", "train.save_model=false", "action=run"]


def dtype_hooks(model: torch.nn.Module, seen: dict[str, Any]) -> list[Any]:
    """Record the dtype of the first block's attention output and of the logits, and the sum
    of the first block's attention weights at each forward (one per step: no accumulation)."""
    inner = getattr(model, "module", model)  # DeepSpeed wraps the model
    attn = inner.transformer.h[0].attn
    head = inner.lm_head

    def hook(name: str):
        def record(module: torch.nn.Module, args: Any, out: Any) -> None:
            tensor = out[0] if isinstance(out, tuple) else out
            seen.setdefault(name, str(tensor.dtype).removeprefix("torch."))
        return record

    def weights(module: torch.nn.Module, args: Any) -> None:  # as this forward sees them
        seen.setdefault("c_attn_sums", []).append(float(module.weight.detach().double().sum()))

    return [attn.register_forward_hook(hook("attention")),
            head.register_forward_hook(hook("logits")),
            attn.c_attn.register_forward_pre_hook(weights)]


def run_pair(overrides: list[str], run_dir: str, info: distributed.RankInfo) -> dict[str, Any]:
    with initialize_config_module("configs", version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, *COMMON])
    job = compose_job(cfg, run_dir)
    try:
        validate(job, Hardware())
    except ConfigError as e:
        return {"rejected": str(e)}
    if info.rank == 0:  # what the launcher writes into the run dir before the ranks start
        Path(run_dir).mkdir(parents=True)
        plan = make_plan(job, "cpu", os.cpu_count() or 1)
        if job.parallelism.backend == "deepspeed":
            (Path(run_dir) / DEEPSPEED_JSON).write_text(plan.deepspeed_json())
    dist.barrier()
    model = build_for_rank(job, info)
    engine = setup_strategy(model, job, "cpu")
    seen: dict[str, Any] = {}
    handles = dtype_hooks(engine.model, seen)
    accum, global_batch = resolve_batch(job)
    dataset, _ = train_and_held_out(job)
    data = batches(dataset, job, info.rank, info.world_size)
    logger = make_logger(job, info.rank)  # rank 0 writes the run's metrics.jsonl
    job_losses = loop.train(loop.Training(engine, job, logger, accum, global_batch), data)
    logger.close()
    for h in handles:
        h.remove()
    sums = seen.pop("c_attn_sums")
    out = {"losses": job_losses, "dtypes": seen, "c_attn_sums": sums,
           # the last record of metrics.jsonl, read back from the file
           "last": {k: v for k, v in read_metrics(Path(run_dir) / "metrics.jsonl")[-1].items()
                    if k in ("loss_scale", "overflow_steps")} if info.rank == 0 else {}}
    del engine, model, data
    gc.collect()
    dist.barrier()
    return out


def main() -> None:
    out_path, pairs_path = sys.argv[1], sys.argv[2]
    pairs = json.loads(Path(pairs_path).read_text())
    info = distributed.init("cpu", 300)
    results = {}
    for name, overrides in pairs.items():
        results[name] = run_pair(overrides, f"{out_path}.runs/{name.replace('/', '-')}", info)
        if dist.get_rank() == 0:
            print(name, json.dumps(results[name])[:300], flush=True)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main()
