"""Generate text from a trained causal LM under the configured strategy:
`python -m orchestrator +recipe=generate model.pretrained_path=<run_dir>/model
generate.prompts='[...]'`.

The prompts are dealt out across ranks; each rank continues its share as one left-padded batch
(under ZeRO-3 every rank runs the same number of forwards, since the weights are sharded). Prompt
i samples from its own generator seeded with `train.seed + i`, so a completion is the same
whatever the world size or batch. Rank 0 writes `<run_dir>/generations.jsonl` in prompt order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from orchestrator.config.load import load_job
from orchestrator.config.schema import JobConfig
from orchestrator.data import get_tokenizer
from orchestrator.run.distributed import RankInfo
from orchestrator.run.metrics import write_error
from orchestrator.run.quantized import run_inference  # quantized models: one process
from orchestrator.run.rank_main import run_rank
from orchestrator.run.sampling import generate_batch
from orchestrator.run.strategies.base import Engine


def _all_done(done: bool, device: str) -> bool:
    """True once every rank's batch is finished (a collective; NCCL only takes tensors on the
    rank's own GPU, so the flag lives on the engine's device)."""
    flag = torch.tensor([int(done)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def run(config_path: str) -> None:
    job = load_job(config_path)
    run_inference(job, lambda engine, info: generate(job, engine, info))


def main(argv: list[str]) -> int:
    return run_rank(lambda: run(argv[1]))


def generate(job: JobConfig, engine: Engine, info: RankInfo) -> None:
    g_cfg, seed = job.generate, job.train.seed
    tok = get_tokenizer(job)
    mine = list(enumerate(g_cfg.prompts))[info.rank::info.world_size]
    # A rank without a prompt of its own still takes part in every forward.
    work = mine or [(0, g_cfg.prompts[0])]
    with engine.autocast():
        ids = generate_batch(
            engine.model, [tok.encode(p) for _, p in work], g_cfg.max_new_tokens,
            g_cfg.temperature, g_cfg.top_k, g_cfg.top_p,
            [torch.Generator().manual_seed(seed + i) for i, _ in work], eos_id=tok.eos_id,
            max_len=engine.hf_model().config.max_position_embeddings, device=engine.device,
            all_done=lambda done: _all_done(done, engine.device), vocab=tok.vocab_size)
    rows = [{"index": i, "prompt": p, "completion": tok.decode(t), "token_ids": t,
             "temperature": g_cfg.temperature, "top_k": g_cfg.top_k, "top_p": g_cfg.top_p,
             "seed": seed + i, "rank": info.rank}
            for (i, p), t in zip(mine, ids, strict=False)]  # a stand-in row is dropped
    gathered: list[list[dict]] = [[] for _ in range(info.world_size)]
    dist.all_gather_object(gathered, rows)
    if info.rank == 0:
        out = Path(job.run_dir) / "generations.jsonl"
        rows = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
        try:
            out.write_text("".join(json.dumps(row) + "\n" for row in rows))
        except OSError as e:
            raise write_error(out, e, "after generating") from e
        for row in rows:
            print(f"{row['prompt']!r} -> {row['completion']!r}", flush=True)
        print(f"generations: {out}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
