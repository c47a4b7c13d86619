"""Our tokens/s ÷ a plain hand-written DDP loop's, same model, data, batch and ranks, one run.

    python scripts/bench_overhead.py [--steps 30] [--model gpt2_small_cpu] [--recipe ddp]

Both sides run 2 gloo ranks under torchrun; the median step time after 3 warm-up steps is used.
With `--worker` this file is the plain loop itself (no orchestrator engine, loop or logger).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP = 3


def plain_worker(config_path: str, out: str) -> None:
    """A hand-written DDP loop: the baseline an ML engineer would write."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    sys.path.insert(0, str(REPO))
    from orchestrator.config.load import load_job
    from orchestrator.data import batches, build_dataset
    from orchestrator.models.build import build_model

    job = load_job(config_path)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = DDP(build_model(job.model, seed=job.train.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=job.optim.lr)
    data = batches(build_dataset(job), job, rank, world)
    times = []
    for _ in range(job.train.steps):
        start = time.perf_counter()
        ids = next(data)["input_ids"]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        dist.barrier()
        times.append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--model", default="gpt2_small_cpu")
    p.add_argument("--recipe", default="ddp")
    p.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT"))
    args = p.parse_args()
    if args.worker:
        plain_worker(*args.worker)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "ours"
        overrides = [f"+recipe={args.recipe}", f"model={args.model}", f"train.steps={args.steps}",
                     "logging=none", "logging.progress=false", "train.grad_clip=0",
                     "optim.warmup_steps=0", "optim.schedule=constant"]
        subprocess.run([sys.executable, "-m", "orchestrator", *overrides,
                        f"hydra.run.dir={run_dir}"], cwd=REPO, check=True, capture_output=True)
        from orchestrator.common.records import read_metrics

        metrics = read_metrics(run_dir / "metrics.jsonl")
        ours = statistics.median(m["step_time_s"] for m in metrics[WARMUP:])
        plan = json.loads((run_dir / "plan.json").read_text())
        out = Path(tmp) / "plain.json"
        env = {**os.environ, **plan["env"]}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node=2", __file__, "--worker", str(run_dir / "config.yaml"),
                        str(out)], cwd=REPO, check=True, capture_output=True, env=env)
        plain = statistics.median(json.loads(out.read_text())[WARMUP:])
    tokens = plan["compute"]["tokens_per_step"]
    print(f"model={args.model} params={plan['compute']['params']:,} recipe={args.recipe} "
          f"ranks=2 tokens/step={tokens}")
    print(f"ours:  {tokens / ours:,.0f} tokens/s (median step {ours * 1e3:.1f} ms)")
    print(f"plain: {tokens / plain:,.0f} tokens/s (median step {plain * 1e3:.1f} ms)")
    print(f"ratio ours/plain tokens/s: {plain / ours:.3f}")


if __name__ == "__main__":
    main()
