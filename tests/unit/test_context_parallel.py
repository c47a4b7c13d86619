"""Context parallelism before launch (it runs on CUDA only: the run itself is a row of
scripts/gpu_check.sh): every refusal (one line each), the data split, the plan's activations
and traffic against formulas written out here, and the transformers behaviour the ring
attention relies on. tests/distributed/test_context_parallel.py shards real sequences with
torch's `context_parallel` on 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch

from orchestrator.common.errors import ConfigError
from orchestrator.config.derived import Hardware, data_parallel_rank, data_parallel_size
from orchestrator.planning.activations import activation_bytes
from orchestrator.planning.plan import make_plan
from orchestrator.planning.preflight import validate
from tests.conftest import make_job

GPU = Hardware(cuda_devices=8, bf16_supported=True, capability=(9, 0))
ON_GPU = ["cluster.device=cuda", "cluster.gpu=h100", "cluster.gpus_per_node=4"]
CP2 = ["model=llama_tiny", *ON_GPU, "parallelism.context_parallel=2", "parallelism.zero_stage=3"]
KEY = "config key 'parallelism.context_parallel' has value 2; allowed: "

REFUSED = {
    "cpu": (["model=llama_tiny", "parallelism.context_parallel=2", "parallelism.zero_stage=3"],
            KEY + "1 on cpu (ring attention runs on CUDA's fused SDPA kernels, flash, "
            "memory-efficient or cuDNN; torch has no context-parallel path for CPU attention)"),
    "world": ([*CP2, "cluster.gpus_per_node=3"], KEY + "a divisor of the world size 3"),
    "family": ([*CP2, "model=gpt2_tiny"], KEY + "1 for model.family=gpt2 (context "
               "parallelism is built for: llama)"),
    "with TP": ([*CP2, "parallelism.tensor_parallel=2"],
                "config key 'parallelism.tensor_parallel' has value 2; allowed: 1 with "
                "parallelism.context_parallel=2 (not built yet)"),
    "DDP": ([*CP2, "parallelism.zero_stage=0"],
            "config key 'parallelism.zero_stage' has value 0; allowed: torch with zero_stage 2 "
            "or 3 with parallelism.context_parallel=2 (FSDP2 reduces each sequence's gradients "
            "over its ranks)"),
    "sequence": ([*CP2, "data.seq_len=66"],
                 "config key 'data.seq_len' has value 66; allowed: a multiple of 2 x "
                 "parallelism.context_parallel = 4 (each rank holds a head and a tail chunk of "
                 "every sequence)"),
    "eager attention": ([*CP2, "model.attn_implementation=eager"],
                        "config key 'model.attn_implementation' has value 'eager'; allowed: "
                        "'sdpa' with parallelism.context_parallel=2 (ring attention replaces "
                        "SDPA)"),
    "lora": ([*CP2, "lora.rank=4"], "config key 'lora.rank' has value 4; allowed: not with "
             "parallelism.context_parallel=2 yet (context parallelism trains"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_each_impossible_context_parallel_job_is_one_line(case: str) -> None:
    overrides, want = REFUSED[case]
    with pytest.raises(ConfigError) as err:
        validate(make_job(overrides), GPU if "cluster.device=cuda" in overrides else Hardware())
    line = str(err.value)
    assert "\n" not in line and line.startswith(want), line


def test_the_ranks_of_one_sequence_read_the_same_batch() -> None:
    """8 ranks, C=2: 4 data-parallel shares, ranks (0,1), (2,3), ... read one each."""
    job = make_job([*CP2, "cluster.gpus_per_node=8"])
    validate(job, GPU)
    assert data_parallel_size(job) == 4
    assert [data_parallel_rank(job, r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_the_plan_divides_activations_by_c_and_counts_the_ring() -> None:
    """Each rank holds s/C tokens of every sequence: the activations of a C=1 job with s/C,
    plus one layer's whole-sequence keys and values gathered (2·s·b·kv_heads·head_dim, fp32
    here). The cp traffic per step, from torch's ring attention (all-gather rotation): keys and
    values all-gathered in forward and again in backward ((C-1)/C of them each), and their
    gradients passed around the ring in fp32 (C sends of 1/C), per block and micro batch.
    FSDP2 shards over all 4 ranks (the shard group holds the context-parallel ranks)."""
    job = make_job([*CP2, "data.seq_len=64", "train.micro_batch_size=2"])
    plan = make_plan(job, "cuda", 16)
    half = make_job(["model=llama_tiny", "data.seq_len=32", "train.micro_batch_size=2"])
    kv = 2 * 64 * 2 * 2 * (64 // 4)  # s · b · 2 kv heads · head dim 16, keys and values
    assert plan.memory.activations_bytes == activation_bytes(half) + kv * 4
    assert plan.comm_bytes["cp"] == 2 * (2 * 0.5 * kv * 4 + kv * 4)  # 2 blocks
    assert plan.global_batch_size == 2 * 2  # micro 2 x 2 data-parallel shares
    assert plan.mesh == "1 replica x 4 shards (cp 2: each sequence over 2 of them)"
    assert plan.strategy == "context_parallel"


def test_transformers_builds_no_mask_for_a_shard_given_an_all_ones_mask() -> None:
    """Each rank's positions jump from its head chunk to its tail chunk. Without a mask,
    transformers takes that for packed sequences and builds a block mask of the local length
    (wrong under ring attention); with an all-ones mask, as the engine passes, it builds none
    and SDPA runs causal."""
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                         intermediate_size=128, vocab_size=512)
    config._attn_implementation = "sdpa"
    positions = torch.cat([torch.arange(0, 16), torch.arange(48, 64)]).unsqueeze(0)  # rank 0
    embeds = torch.zeros(1, 32, 64)

    def mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        return create_causal_mask(config=config, inputs_embeds=embeds,
                                  attention_mask=attention_mask, cache=None,
                                  position_ids=positions)

    assert mask(None) is not None
    assert mask(torch.ones(1, 32, dtype=torch.long)) is None
