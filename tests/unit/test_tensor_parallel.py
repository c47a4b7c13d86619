"""Tensor parallelism before launch: every refusal of what must divide what (one line each),
the planner's per-rank slices and activation memory against Korthikanti et al. 2022's formulas
written out here, and the plan's mesh and batch. (The runs themselves:
tests/distributed/test_tensor_parallel.py.)"""

from __future__ import annotations

import pytest
import torch

from orchestrator.common.errors import ConfigError
from orchestrator.config.derived import Hardware, data_parallel_rank, data_parallel_size
from orchestrator.models.build import build_model
from orchestrator.models.tensor_parallel import local_specs
from orchestrator.planning.activations import activation_bytes
from orchestrator.planning.mesh import check_mesh
from orchestrator.planning.plan import make_plan
from orchestrator.planning.preflight import validate
from tests.conftest import make_job

LLAMA = ["model=llama_tiny"]  # 4 heads, 2 KV heads, d_ff 172, vocabulary 512, 2 layers
TP2 = [*LLAMA, "parallelism.tensor_parallel=2"]

REFUSED = {
    "not a divisor of the world": (
        [*LLAMA, "parallelism.tensor_parallel=3"],
        "config key 'parallelism.tensor_parallel' has value 3; allowed: a divisor of the world "
        "size 2 (nodes x gpus_per_node; the data-parallel size is world / tensor_parallel)"),
    "family": (
        ["model=bert_tiny", "parallelism.tensor_parallel=2"],
        "config key 'parallelism.tensor_parallel' has value 2; allowed: 1 for "
        "model.family=bert (tensor parallelism is built for: llama, gpt2)"),
    "heads": (
        [*LLAMA, "cluster.gpus_per_node=8", "parallelism.tensor_parallel=8"],
        "config key 'parallelism.tensor_parallel' has value 8; allowed: a divisor of "
        "model.n_head=4 (each rank computes whole attention heads)"),
    "kv heads": (
        [*LLAMA, "cluster.gpus_per_node=4", "parallelism.tensor_parallel=4"],
        "config key 'parallelism.tensor_parallel' has value 4; allowed: a divisor of "
        "model.n_kv_head=2 (each rank holds whole KV heads)"),
    "d_ff": (
        [*TP2, "model.d_ff=171"],
        "config key 'parallelism.tensor_parallel' has value 2; allowed: a divisor of "
        "model.d_ff=171 (the MLP's columns split evenly)"),
    "vocabulary": (
        [*TP2, "model.vocab_size=515"],
        "config key 'parallelism.tensor_parallel' has value 2; allowed: a divisor of "
        "model.vocab_size=515 (the embedding and head split by vocabulary)"),
    "sequence": (
        [*TP2, "data.seq_len=63"],
        "config key 'parallelism.tensor_parallel' has value 2; allowed: a divisor of "
        "data.seq_len=63 (sequence parallelism splits each sequence)"),
    "deepspeed": (
        [*TP2, "+recipe=deepspeed_zero3"],
        "config key 'parallelism.tensor_parallel' has value 2; allowed: 1 with "
        "parallelism.backend=deepspeed (DeepSpeed's tensor parallelism is AutoTP for "
        "inference; tensor-parallel training runs on torch's device mesh: backend=torch)"),
    "DDP beside TP": (
        [*TP2, "cluster.gpus_per_node=4"],
        "config key 'parallelism.zero_stage' has value 0; allowed: 2 or 3 with "
        "parallelism.tensor_parallel=2 and 2 data-parallel ranks (FSDP2 shards over the "
        "data-parallel dimension of the device mesh; DDP across tensor-parallel groups is "
        "not built)"),
    "replicas": (
        [*TP2, "+recipe=fsdp_zero3", "cluster.gpus_per_node=4",
         "parallelism.replicate_degree=4"],
        "config key 'parallelism.replicate_degree' has value 4; allowed: a divisor of the "
        "data-parallel size 2 (replicas x shard group x tensor_parallel = nodes x "
        "gpus_per_node)"),
    "lora": ([*TP2, "lora.rank=4"],
             "config key 'lora.rank' has value 4; allowed: not with parallelism.tensor_parallel=2 "
             "yet (tensor parallelism trains pretrain/SFT jobs in fp32, bf16 or bf16_pure, "
             "without LoRA, DPO or QAT)"),
    "fp16": ([*TP2, "precision=fp16"],
             "config key 'precision.name' has value 'fp16'; allowed: not with"),
    "qat": ([*TP2, "precision.qat=int8"],
            "config key 'precision.qat' has value 'int8'; allowed: not with"),
    "evaluate": ([*TP2, "+recipe=evaluate"],
                 "config key 'train.task' has value 'evaluate'; allowed: not with"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_each_impossible_layout_is_one_line(case: str) -> None:
    overrides, want = REFUSED[case]
    with pytest.raises(ConfigError) as err:
        validate(make_job(overrides), Hardware())
    line = str(err.value)
    assert "\n" not in line and line.startswith(want), line


def test_a_tensor_parallel_group_stays_in_a_node_unless_allowed() -> None:
    """3 GPUs per node, TP 2: a group would straddle two nodes (the mesh check alone: two
    local nodes are refused by the launcher's own rules)."""
    spans = [*LLAMA, "cluster.nodes=2", "cluster.gpus_per_node=3",
             "parallelism.tensor_parallel=2", "parallelism.zero_stage=3"]
    with pytest.raises(ConfigError) as err:
        check_mesh(make_job(spans))
    assert str(err.value) == (
        "config key 'parallelism.tensor_parallel' has value 2; allowed: a divisor of "
        "cluster.gpus_per_node=3, so that a tensor-parallel group stays inside a node (it "
        "communicates in every layer), or set parallelism.tp_across_nodes=true")
    check_mesh(make_job([*spans, "parallelism.tp_across_nodes=true"]))


def test_the_data_splits_over_the_data_parallel_ranks_only() -> None:
    job = make_job([*TP2, "+recipe=fsdp_zero3", "cluster.gpus_per_node=4"])
    assert data_parallel_size(job) == 2
    assert [data_parallel_rank(job, r) for r in range(4)] == [0, 0, 1, 1]


def test_each_rank_holds_its_slice_of_the_split_layers() -> None:
    """The planner's slices against the layout written out from Megatron-LM's paper on the
    real module names: column-parallel q/k/v/gate/up/head by output rows, row-parallel
    o/down by input columns, the embedding by vocabulary rows, norms whole."""
    model = build_model(make_job(LLAMA).model, seed=0, device="meta")
    rows = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head", "embed_tokens")
    want = {}
    for name, p in model.named_parameters():
        module = name.split(".")[-2]
        shape = list(p.shape)
        if module in rows:
            shape[0] //= 2
        elif module in ("o_proj", "down_proj"):
            shape[1] //= 2
        want[name] = tuple(shape)
    from orchestrator.models.build import param_specs

    got = {s.name: s.shape for s in local_specs(param_specs(make_job(LLAMA).model), "llama", 2)}
    assert got == want


def test_activations_follow_the_papers_sequence_parallel_formula() -> None:
    """Eager attention (its scores stored), bf16, micro batch 2: per layer
    s·b·h·(34/t + 5·a·s/(h·t)) bytes (paper eq. 4 with sequence parallelism), with
    checkpointing each layer's input slice s·b·h·2/t; the logits, split by vocabulary through
    the loss, s·b·V·(2 + 8)/t."""
    common = [*LLAMA, "precision=bf16", "model.attn_implementation=eager",
              "train.micro_batch_size=2", "data.seq_len=64"]
    s, b, h, a, v, layers = 64, 2, 64, 4, 512, 2
    for t in (1, 2, 4):
        tp = [f"parallelism.tensor_parallel={t}", f"cluster.gpus_per_node={max(t, 2)}"]
        per_layer = s * b * h * (34 / t + 5 * a * s / (h * t))
        logits = s * b * v * 10 / t
        assert activation_bytes(make_job([*common, *tp])) == layers * per_layer + logits
        checkpointed = make_job([*common, *tp, "train.activation_checkpointing=true"])
        assert activation_bytes(checkpointed) == layers * s * b * h * 2 / t + per_layer + logits


def test_the_plan_shows_the_mesh_and_the_data_parallel_batch() -> None:
    job = make_job([*TP2, "+recipe=fsdp_zero3", "cluster.gpus_per_node=4",
                    "train.micro_batch_size=4"])
    plan = make_plan(job, "cpu", 4)
    assert plan.mesh == "1 replica x 2 shards x tp 2 (sequence parallel)"
    assert (plan.tensor_parallel, plan.global_batch_size) == (2, 8)


def _auto(model: str, nodes: int) -> tuple[object, str]:
    from orchestrator.planning.fit import choose

    job = make_job([f"model={model}", "parallelism=auto", "precision=bf16", "cluster.gpu=h100",
                    f"cluster.nodes={nodes}", "cluster.gpus_per_node=8", "launcher=slurm",
                    "data.seq_len=4096", "train.micro_batch_size=2",
                    "train.activation_checkpointing=true", "action=plan"], run_dir="/tmp/unused")
    return choose(job, lambda j: make_plan(j, "cuda", 16))


def test_auto_takes_the_fitting_layout_with_the_shortest_estimated_step() -> None:
    """Llama 3 70B on 4x8 H100 fits under ZeRO-3 alone, but its all-gathers cross the network
    every step: TP=2 inside the node sends 8x less over it and wins on time. 405B on 16x8 fits
    only over TP (ZeRO-3 x TP, or 16 pipeline stages x TP 8), where ZeRO-3 x TP=4 is the
    fastest. Each reason names the slower fitting layouts and those that would not fit."""
    chosen, reason = _auto("llama3_70b", 4)
    assert chosen.parallelism.tensor_parallel == 2 and chosen.parallelism.zero_stage == 3
    assert reason.startswith("fsdp_zero3 x tp 2 with micro batch 4 needs ")
    assert "fsdp_zero3 1" in reason.split("; slower: ")[1]  # fits, and is slower
    # pipelines under ZeRO-2 hold a whole stage gathered with its gradients: too much here
    assert reason.endswith("would not fit: ddp, zero1, fsdp_zero2, pp 2, pp 4, pp 8")
    chosen, reason = _auto("llama3_405b", 16)
    assert chosen.parallelism.tensor_parallel == 4
    assert "fsdp_zero3 x tp 8" in reason.split("; slower: ")[1]  # 16 stages x TP 8 too
    assert reason.endswith("would not fit: ddp, zero1, fsdp_zero2, fsdp_zero3, pp 2, pp 4, "
                           "pp 8, pp 2 x tp 8, pp 4 x tp 8, pp 8 x tp 8")
    assert check_mesh(chosen) is None


def test_the_step_estimate_hides_data_parallel_traffic_behind_compute_only() -> None:
    """The 70B TP=2 plan, by hand: compute at 40 % MFU of 989.4 TFLOP/s; dp bytes at 400 Gbit/s
    (50 GB/s: FSDP2's group spans the 4 nodes), of which only what exceeds the compute counts;
    tp bytes at NVLink's 450 GB/s one way, all on the critical path."""
    chosen, _ = _auto("llama3_70b", 4)
    plan = make_plan(chosen, "cuda", 16)
    est, sent = plan.step_estimate, plan.comm_bytes
    compute = plan.compute.flops_per_token * plan.compute.tokens_per_step / (
        32 * 989.4e12 * 0.4)
    assert est["compute_s"] == pytest.approx(compute)
    assert est["dp_s"] == pytest.approx(sent["dp"] / 50e9)
    assert est["total_s"] == pytest.approx(
        compute + max(0.0, sent["dp"] / 50e9 - compute) + sent["tp"] / 450e9)


def test_gpt2s_fused_columns_give_each_rank_its_own_heads() -> None:
    """c_attn's [q | k | v] columns (4 heads of 2, so H = 8), regrouped for 2 ranks: rank r's
    half is q, k and v of heads 2r and 2r+1, written out here index by index; and the inverse
    restores transformers' order (what checkpoints and the saved model hold)."""
    from orchestrator.run.strategies.fused_qkv import regroup

    h, head, tp = 8, 2, 2
    columns = torch.arange(3 * h).float().unsqueeze(0)  # Conv1D weight (in=1, out=3H)
    grouped = regroup(columns, 1, tp)
    for r in range(tp):
        mine = [part * h + c for part in range(3)  # q, k, v blocks of the fused output
                for c in range(r * h // tp, (r + 1) * h // tp)]
        assert grouped[0, r * 3 * h // tp:(r + 1) * 3 * h // tp].tolist() == mine
        assert len(mine) == 3 * 2 * head  # two heads' q, k and v
    assert torch.equal(regroup(grouped, 1, tp, inverse=True), columns)
    bias = torch.arange(3 * h).float()
    assert torch.equal(regroup(bias, 0, tp), grouped[0])


def test_the_plan_splits_gpt2s_conv1d_layers_as_the_ranks_do() -> None:
    """Conv1D stores (in, out): c_attn and c_fc split by columns (dim 1, and their biases),
    attention's and the MLP's c_proj by rows (dim 0, their biases whole); the token embedding
    and the head by vocabulary; position embedding and norms whole."""
    from orchestrator.models.build import param_specs

    specs = param_specs(make_job(["model=gpt2_tiny", "model.tie_embeddings=false"]).model)
    got = {s.name: s.shape for s in local_specs(specs, "gpt2", 2)}
    h, v = 64, 512
    assert got["transformer.h.0.attn.c_attn.weight"] == (h, 3 * h // 2)
    assert got["transformer.h.0.attn.c_attn.bias"] == (3 * h // 2,)
    assert got["transformer.h.0.attn.c_proj.weight"] == (h // 2, h)
    assert got["transformer.h.0.attn.c_proj.bias"] == (h,)
    assert got["transformer.h.0.mlp.c_fc.weight"] == (h, 4 * h // 2)
    assert got["transformer.h.0.mlp.c_proj.weight"] == (4 * h // 2, h)
    assert got["transformer.wte.weight"] == got["lm_head.weight"] == (v // 2, h)
    assert got["transformer.wpe.weight"] == (128, h)
    assert got["transformer.h.0.ln_1.weight"] == (h,)
