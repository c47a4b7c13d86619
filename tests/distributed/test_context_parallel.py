"""Context parallelism's sequence split and loss on 2 real gloo ranks, without its ring attention
(CUDA only; scripts/gpu_check.sh runs it): torch's own `context_parallel` shards the token ids,
targets and positions the engine hands it, and the ranks' `shard_loss` values, averaged as the
loop averages every rank's loss, equal transformers' own mean loss of the whole sequences."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port

SEQ, BATCH, VOCAB = 32, 2, 512


def _rank(rank: int, port: int, out: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestrator.run.mesh import context_mesh
    from orchestrator.run.strategies.context_parallel import (
        IGNORE,
        ring_attention,
        sequence_buffers,
        shard_loss,
    )

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    torch.manual_seed(0)  # the same model and batch on both ranks
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=2,
                                         intermediate_size=128, vocab_size=VOCAB))
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    labels = ids.clone()
    labels[:, :5] = IGNORE  # a masked prompt, as SFT has
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        want = model(input_ids=ids, labels=labels).loss.item()
    local_ids, targets, positions = sequence_buffers({"input_ids": ids, "labels": labels}, "cpu")
    scored = (targets != IGNORE).sum()
    with ring_attention(context_mesh("cpu", 2, 2), [local_ids, targets, positions]):
        rows = torch.arange(BATCH).unsqueeze(1)
        local = shard_loss(logits[rows, positions], targets, scored, 2)
        same_ids = torch.equal(local_ids, ids[rows, positions])
        mine = positions[0].tolist()
    dist.all_reduce(local)
    if rank == 0:
        Path(out).write_text(json.dumps({"got": local.item() / 2, "want": want,
                                         "same_ids": same_ids, "positions": mine}))
    dist.destroy_process_group()


def test_sharded_sequences_give_the_whole_sequences_loss(tmp_path) -> None:
    """Within 1e-6 of transformers' loss; each rank holds 16 of the 32 positions, rank 0 the
    head chunk 0-7 and the tail chunk 24-31 (torch's load balancer), with the token ids and
    targets of exactly those positions. Shifting the targets after the split, or forgetting
    the C scaling, is off by a whole token's loss or a factor of 2."""
    out = tmp_path / "result.json"
    mp.spawn(_rank, args=(free_port(), str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())
    assert result["positions"] == [*range(0, 8), *range(24, 32)]
    assert result["same_ids"]
    assert abs(result["got"] - result["want"]) <= 1e-6, result
