"""A plain DeepSpeed training script: the baseline `scripts/bench.py` holds our DeepSpeed recipes
against. Written without any of this project's code (it imports only torch, transformers and
deepspeed), the way DeepSpeed's getting-started guide shows it: `deepspeed.initialize` with a
minimal config and DeepSpeed's defaults for everything else, then `engine(...)`,
`engine.backward(loss)`, `engine.step()`.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        scripts/baselines/plain_deepspeed.py --out plain_deepspeed.json [--steps 12] [--stage 3]

The config: `train_micro_batch_size_per_gpu`, `gradient_accumulation_steps: 1`,
`gradient_clipping: 1.0` and `zero_optimization: {stage: N}`; no bucket, prefetch or
persistence settings (DeepSpeed's defaults). The optimizer is a client `torch.optim.AdamW`, as
ours is (DeepSpeed's own fused Adam needs a compiled op, which the CPU build does not ship).

What it does, and what it matches in our `model=gpt2_small_cpu` runs (as plain_fsdp2.py):
- model: `GPT2LMHeadModel` of the same shape (4 layers, d_model 256, 8 heads, vocabulary 2048,
  256 positions, dropout 0, tied embeddings, SDPA), from the same seed on every rank, fp32;
- data: random token ids seeded with seed + rank, micro batch 4 of 64 tokens per rank;
- step: forward, `engine.backward`, `engine.step` (clipping at 1.0 inside), AdamW (lr 3e-3,
  betas 0.9/0.95, eps 1e-8, weight decay 0) with linear warm-up over 2 steps then cosine to
  0.1 x lr, set on the optimizer's groups before each step, gloo process group;
- timing: after a barrier, each step's time runs from the end of the previous step to the end
  of this one, the all-reduce of the step's loss. Tokens/s = global tokens per step / step time.

Rank 0 writes `--out` as plain_fsdp2.py does.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 2048


def build_model(seed: int) -> GPT2LMHeadModel:
    """GPT-2 with the shape of our `gpt2_small_cpu` (3.75M parameters), random from `seed`."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=256, n_layer=4, n_head=8,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=True, attn_implementation="sdpa")
    return GPT2LMHeadModel(config)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up to `--lr` over `--warmup` steps, then cosine to `--lr * --min-lr-ratio`."""
    if step <= args.warmup:
        return args.lr * step / max(1, args.warmup)
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file rank 0 writes")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=3, help="steps left out of the median")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--stage", type=int, choices=(1, 2, 3), default=3, help="ZeRO stage")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=0.0)
    config = {"train_micro_batch_size_per_gpu": args.micro_batch,
              "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": args.stage}}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=config)
    gen = torch.Generator().manual_seed(args.seed + rank)
    tokens_per_step = args.micro_batch * args.seq_len * world
    records = []
    dist.barrier()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = torch.randint(VOCAB, (args.micro_batch, args.seq_len), generator=gen)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        now = time.perf_counter()
        records.append({"step": step, "time_s": now - start,
                        "tokens_per_s": tokens_per_step / (now - start),
                        "loss": mean_loss.item() / world, "lr": lr})
        start = now
    if rank == 0:
        timed = [r["tokens_per_s"] for r in records[args.skip:]]
        Path(args.out).write_text(json.dumps({
            "script": "plain_deepspeed", "stage": args.stage, "world_size": world,
            "tokens_per_step": tokens_per_step,
            "median_tokens_per_s": statistics.median(timed) if timed else None,
            "steps_time_s": sum(r["time_s"] for r in records), "steps": records,
        }, indent=2) + "\n")
    dist.barrier()
    del engine, optimizer, model
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
