"""A plain FSDP2 training script: the baseline `scripts/bench.py` holds our `fsdp_zero2`,
`fsdp_zero3` and `deepspeed_zero3` recipes against. Written without any of this project's code
(it imports only torch and transformers), the way the FSDP2 docs show it: `fully_shard` on each
transformer block, then on the root.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        scripts/baselines/plain_fsdp2.py --out plain_fsdp2.json [--steps 12] [--no-reshard]

`--reshard` (the default) passes `reshard_after_forward=True` to every block: parameters are
freed after each block's forward and gathered again in backward (ZeRO-3). `--no-reshard` keeps
them from forward until backward ends (ZeRO-2: only gradients and optimizer state sharded). The
root is sharded with the default, under which FSDP2 never reshards the root after forward.

What it does, and what it matches in our `model=gpt2_small_cpu` runs:
- model: `GPT2LMHeadModel` from a `GPT2Config` of the same shape (4 layers, d_model 256,
  8 heads, vocabulary 2048, 256 positions, dropout 0, tied embeddings, SDPA attention),
  initialised from the same seed (1234) on every rank, fp32, then sharded in place (each rank
  keeps its shard of every parameter) on a 1-D CPU device mesh;
- data: random token ids from a `torch.Generator` seeded with seed + rank, micro batch 4 of 64
  tokens per rank (our schema's defaults), labels = inputs (the model shifts them);
- step: forward, backward, `clip_grad_norm_(1.0)`, AdamW (lr 3e-3, betas 0.9/0.95, eps 1e-8,
  weight decay 0), `zero_grad`, with linear warm-up over 2 steps then cosine decay to 0.1 x lr
  (our schema's optimizer defaults), gloo process group;
- timing, as our loop logs with `train.log_every=1`: after a barrier, each step's time runs from
  the end of the previous step to the end of this one, which is the all-reduce of the step's loss
  (our loop all-reduces the logged losses too), so data, LR update and the loss collective are
  inside it. Tokens/s = global tokens per step / step time.

Rank 0 writes `--out`: every step's time, tokens/s, loss and LR, the median tokens/s over the
steps after `--skip` (default 3, i.e. steps 4..N) and the sum of all steps' times.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
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
    if args.schedule == "constant":
        return args.lr
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def record(records: list[dict], step: int, start: float, tokens_per_step: int, loss: float,
           lr: float) -> float:
    """Append step `step`'s time (from `start`, the end of the previous step), tokens/s, loss
    and LR; return now, the next step's start."""
    now = time.perf_counter()
    records.append({"step": step, "time_s": now - start,
                    "tokens_per_s": tokens_per_step / (now - start), "loss": loss, "lr": lr})
    return now


def write_result(args: argparse.Namespace, tokens_per_step: int, records: list[dict],
                 **about: object) -> None:
    """Rank 0's `--out`: `about` (script, world size, ...), every step, the median tokens/s
    over the steps after `--skip` and the sum of all steps' times."""
    timed = [r["tokens_per_s"] for r in records[args.skip:]]
    Path(args.out).write_text(json.dumps({
        **about, "tokens_per_step": tokens_per_step,
        "median_tokens_per_s": statistics.median(timed) if timed else None,
        "steps_time_s": sum(r["time_s"] for r in records), "steps": records,
    }, indent=2) + "\n")


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
    p.add_argument("--reshard", action=argparse.BooleanOptionalAction, default=True,
                   help="reshard_after_forward of the blocks: True = ZeRO-3, False = ZeRO-2")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(args.seed)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, reshard_after_forward=args.reshard)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=0.0)
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
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        start = record(records, step, start, tokens_per_step, mean_loss.item() / world, lr)
    if rank == 0:
        write_result(args, tokens_per_step, records, script="plain_fsdp2",
                     reshard=args.reshard, world_size=world)
    dist.barrier()  # no rank tears gloo down while another still uses it (a rank whose
    # peer had closed its connections aborted with SIGABRT at exit, seen once)
    # Free what holds the process group before destroying it: freeing a DDP reducer (or an
    # FSDP mesh) after destroy_process_group can hang a gloo rank at exit (seen once in 10).
    del model, optimizer, mesh
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
