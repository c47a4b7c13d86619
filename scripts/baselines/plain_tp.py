"""A plain tensor-parallel training script: the baseline `scripts/bench.py` holds our
`parallelism.tensor_parallel=2` run against. Written without any of this project's code (it
imports only torch and transformers), with the torch APIs the TP tutorial and torchtitan use:
`parallelize_module` with `ColwiseParallel` / `RowwiseParallel` / `SequenceParallel` /
`PrepareModuleInput` on a transformers Llama, every rank one tensor-parallel rank.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        scripts/baselines/plain_tp.py --out plain_tp.json [--steps 12]

What it does, and what it matches in our run (`model=llama_tiny` resized to the shape below,
`parallelism.tensor_parallel=2`):
- model: `LlamaForCausalLM` (4 layers, d_model 256, 8 heads, 4 KV heads, d_ff 688,
  vocabulary 2048, 256 positions, untied, SDPA attention), from seed 1234, fp32;
- layout (Megatron-LM's, with sequence parallelism): q/k/v/gate/up column-wise, o/down
  row-wise with sequence-sharded outputs, norms sequence-parallel, the embedding split by
  vocabulary (its output whole: transformers' Llama derives positions and the causal mask from
  it), the first block taking its sequence slice, the head column-wise with gathered logits;
- data: the same random ids on every rank of the group (seeded with the seed alone), micro
  batch 4 of 64 tokens, labels = inputs;
- step, optimizer, schedule and timing as the other baselines (see plain_fsdp2.py); AdamW with
  torch's default kernel for DTensor parameters. Tokens/s = one group's tokens per step / step
  time.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from plain_fsdp2 import lr_at, parse_args, record, write_result
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 2048


def build_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, intermediate_size=688,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def parallelize(model: LlamaForCausalLM, mesh) -> None:  # noqa: ANN001 - a DeviceMesh
    for i, block in enumerate(model.model.layers):
        parallelize_module(block, mesh, {
            "input_layernorm": SequenceParallel(),
            "post_attention_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(
                input_kwarg_layouts={"hidden_states": Shard(1)},
                desired_input_kwarg_layouts={"hidden_states": Replicate()}),
            "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),),
                                      desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        })
        if i == 0:
            parallelize_module(block, mesh, PrepareModuleInput(
                input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                use_local_output=True))
    parallelize_module(model.model.embed_tokens, mesh,
                       RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
    parallelize_module(model.model.norm, mesh, SequenceParallel())
    parallelize_module(model.lm_head, mesh,
                       ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()))


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(args.seed)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    parallelize(model, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)  # one batch for the whole group
    tokens_per_step = args.micro_batch * args.seq_len
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
        write_result(args, tokens_per_step, records, script="plain_tp", world_size=world)
    dist.barrier()
    del model, optimizer, mesh
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
