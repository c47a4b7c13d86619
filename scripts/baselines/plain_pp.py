"""A plain pipeline-parallel training script: the baseline `scripts/bench.py` holds our
`parallelism.pipeline_parallel=2` run against. Written without any of this project's code (it
imports only torch and transformers), with `torch.distributed.pipelining` as its docs show it:
each rank builds the model, keeps its stage's blocks, wraps it in a `PipelineStage` and steps a
schedule over the whole batch.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        scripts/baselines/plain_pp.py --out plain_pp.json [--steps 12] [--schedule-name 1f1b]

What it does, and what it matches in our run (the Llama of plain_tp.py's shape,
`parallelism.pipeline_parallel=2`, micro batch 8 in 4 pipeline micro-batches):
- model: plain_tp.py's `LlamaForCausalLM` from seed 1234 on every rank (each keeps only its
  stage: blocks split evenly, the embedding on the first, the final norm and head on the last);
- data: the same random ids on every rank (seeded with the seed alone), 8 sequences of 64
  tokens per step, split into 4 micro-batches;
- step: the schedule's forward and backward (loss: mean next-token cross-entropy per
  micro-batch, gradients scaled by the micro-batch count), the global grad norm over both stages
  clipped to 1.0, AdamW with torch's default kernel and plain_fsdp2.py's schedule; the last
  stage's loss is broadcast, so the step ends with a collective as ours does. Tokens/s = the
  step's tokens / step time.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from plain_fsdp2 import lr_at, parse_args, record, write_result
from plain_tp import VOCAB, build_model
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from transformers.masking_utils import create_causal_mask

MICROBATCHES = 4


class Stage(nn.Module):
    """Stage `index` of `stages`: its share of the blocks, the embedding first, the head last."""

    def __init__(self, model: nn.Module, index: int, stages: int) -> None:
        super().__init__()
        n = len(model.model.layers)
        per = n // stages
        self.config = model.config
        self.embed = model.model.embed_tokens if index == 0 else None
        self.blocks = nn.ModuleList(model.model.layers[index * per:(index + 1) * per])
        self.rotary = model.model.rotary_emb
        last = index == stages - 1
        self.norm = model.model.norm if last else None
        self.head = model.lm_head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.embed is not None else x
        positions = torch.arange(h.shape[1]).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=None,
                                  cache=None, position_ids=positions)
        rotary = self.rotary(h, position_ids=positions)
        for block in self.blocks:
            h = block(h, attention_mask=mask, position_ids=positions,
                      position_embeddings=rotary)
        return self.head(self.norm(h)) if self.head is not None else h


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), labels[:, 1:].reshape(-1))


def main() -> None:
    schedule_name = "gpipe" if "--gpipe" in sys.argv else "1f1b"
    sys.argv = [a for a in sys.argv if a != "--gpipe"]
    args = parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    stage = Stage(build_model(args.seed), rank, world)
    pipe = PipelineStage(stage, rank, world, torch.device("cpu"))
    kind = ScheduleGPipe if schedule_name == "gpipe" else Schedule1F1B
    schedule = kind(pipe, n_microbatches=MICROBATCHES, loss_fn=loss_fn)
    optimizer = torch.optim.AdamW(stage.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    batch = 2 * args.micro_batch  # 8 sequences per step, as our run's micro batch
    tokens_per_step = batch * args.seq_len
    records = []
    dist.barrier()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = torch.randint(VOCAB, (batch, args.seq_len), generator=gen)
        losses: list[torch.Tensor] = []
        if rank == 0:
            schedule.step(ids)
        else:
            schedule.step(target=ids, losses=losses)
        squares = sum((p.grad.norm() ** 2 for p in stage.parameters()), torch.zeros(()))
        dist.all_reduce(squares)
        coef = torch.clamp(1.0 / (squares.sqrt() + 1e-6), max=1.0)
        for p in stage.parameters():
            p.grad.mul_(coef)
        optimizer.step()
        optimizer.zero_grad()
        loss = torch.stack(losses).mean().detach() if losses else torch.zeros(())
        dist.broadcast(loss, src=world - 1)
        start = record(records, step, start, tokens_per_step, loss.item(), lr)
    if rank == 0:
        write_result(args, tokens_per_step, records, script="plain_pp", schedule=schedule_name,
                     world_size=world)
    dist.barrier()
    del stage, pipe, schedule, optimizer
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
