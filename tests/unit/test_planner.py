"""The planner: real parameter counts, ZeRO formulas, activations, compute, cost, fit and auto."""

from __future__ import annotations

import resource

import pytest
import torch

from orchestrator.cli import execute
from orchestrator.common.errors import ConfigError
from orchestrator.config.derived import Hardware
from orchestrator.config.gpus import GPUS
from orchestrator.planning import compute, fit, memory
from orchestrator.planning.activations import activation_bytes
from orchestrator.planning.plan import make_plan
from orchestrator.planning.preflight import validate
from tests.conftest import make_job, run_ok

GB = 1e9

# Hugging Face's own counts for these architectures (tied embeddings once).
PUBLISHED = {
    "gpt2": 124_439_808, "gpt2_medium": 354_823_168, "gpt2_large": 774_030_080,
    "gpt2_xl": 1_557_611_200, "llama2_7b": 6_738_415_616, "llama3_8b": 8_030_261_248,
    "bert_base": 109_514_298, "t5_base": 222_903_552,
}


def _hf_count(name: str) -> int:
    """Counted from transformers directly, with the architecture written out here."""
    import transformers as tf

    builders = {
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config()),
        "gpt2_medium": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=24, n_embd=1024,
                                                                 n_head=16)),
        "gpt2_large": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=36, n_embd=1280,
                                                                n_head=20)),
        "gpt2_xl": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=48, n_embd=1600, n_head=25)),
        "llama2_7b": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, vocab_size=32000)),
        "llama3_8b": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
        "bert_base": lambda: tf.BertForMaskedLM(tf.BertConfig()),
        "t5_base": lambda: tf.T5ForConditionalGeneration(tf.T5Config(
            d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64)),
    }
    with torch.device("meta"):
        model = builders[name]()
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_equals_transformers(name: str) -> None:
    plan = make_plan(make_job([f"model={name}", "action=plan"]), "cuda", cpu_count=2)
    assert plan.compute.params == _hf_count(name) == PUBLISHED[name]


def test_planning_a_7b_model_allocates_nothing() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    plan = make_plan(make_job(["model=llama3_8b", "cluster.gpu=h100", "action=plan"]), "cuda", 2)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert plan.compute.params > 8e9 and grown_kib < 1024 * 1024  # 8B fp32 would be 32 GB


def test_zero_paper_figure_1_numbers() -> None:
    """ZeRO paper, Figure 1: 7.5B parameters, 64 GPUs, mixed-precision Adam (K=12)."""
    psi, n = 7_500_000_000, 64
    got = [memory.zero_paper_bytes(psi, n, stage, "bf16") / GB for stage in range(4)]
    assert got == pytest.approx([120, 31.4, 16.6, 1.875], abs=0.1)


def test_activations_scale_and_checkpointing_cuts_them() -> None:
    base = make_job(["model=gpt2", "data.seq_len=1024", "train.micro_batch_size=4"])
    a = activation_bytes(base)
    assert activation_bytes(base, micro_batch=8) == pytest.approx(2 * a, rel=1e-6)
    ac = make_job(["model=gpt2", "data.seq_len=1024", "train.micro_batch_size=4",
                   "train.activation_checkpointing=true"])
    logits = 1024 * 4 * 50257 * (4 + 8)  # fp32 logits, their fp32 copy and gradient
    assert a - activation_bytes(ac) > 0.8 * (a - logits)  # checkpointing keeps block inputs
    eager = make_job(["model=gpt2", "data.seq_len=1024", "train.micro_batch_size=4",
                      "model.attn_implementation=eager"])
    assert activation_bytes(eager) > a  # materialised attention scores


def test_compute_flops_chinchilla_and_budget_inverse() -> None:
    c = compute.estimate(params=10**9, global_batch=512, seq_len=2048, steps=19_073, layers=24,
                         d_model=2048)
    assert c.flops == pytest.approx((6e9 + 12 * 24 * 2048 * 2048) * c.tokens)
    assert c.tokens_vs_chinchilla == pytest.approx(c.tokens / 2e10)
    assert c.chinchilla_verdict.startswith("at the Chinchilla optimum")
    assert compute.verdict(0.25) == "under the Chinchilla optimum by 4.0x"
    assert compute.verdict(3.0) == "over the Chinchilla optimum by 3.0x"
    n, d = compute.chinchilla_optimum(6 * 70e9 * 1.4e12)  # Chinchilla: 70B params, 1.4T tokens
    assert n == pytest.approx(70e9, rel=0.01) and d == pytest.approx(1.4e12, rel=0.01)


def test_time_and_cost_follow_the_gpu_table() -> None:
    """Worked by hand: GPT-2 (124,439,808 parameters, HF's count) without its 1024 x 768
    position table (a lookup, no matmul) costs 6 x 123,653,376 FLOPs per token, plus attention's
    12 x 12 layers x 768 x 1024 positions = 855,166,464. A step is 8 GPUs x 4 x 1024 = 32,768
    tokens: 2.8022e13 FLOPs, which 8 A100s (312 TFLOP/s bf16, NVIDIA's sheet) at 50 % MFU do
    in 0.022454 s; 1000 steps on 8 GPUs are 0.049897 GPU-hours, $0.099794 at $2/GPU-hour."""
    job = make_job(["model=gpt2", "cluster.gpu=a100_80gb", "cluster.gpus_per_node=8",
                    "precision=bf16", "plan.mfu=0.5", "cluster.gpu_hour_usd=2.0",
                    "data.seq_len=1024", "train.micro_batch_size=4", "train.steps=1000",
                    "action=plan"])
    c = make_plan(job, "cuda", 2).compute
    assert (c.flops_per_token, c.tokens_per_step) == (855_166_464, 32_768)
    assert c.step_time_s == pytest.approx(0.0224536, rel=1e-5)
    assert c.gpu_hours == pytest.approx(0.0498969, rel=1e-5)
    assert c.cost_usd == pytest.approx(0.0997938, rel=1e-5)


def test_gpu_table_has_the_promised_devices() -> None:
    for name in ("v100", "a100_40gb", "a100_80gb", "h100", "h100_pcie", "h200", "l4"):
        gpu = GPUS[name]
        assert gpu.memory_bytes > 10 * GB and gpu.fp32 > 0 and gpu.fp16
    assert GPUS["v100"].bf16 is None
    assert GPUS["h100"].fp8 == pytest.approx(2 * GPUS["h100"].bf16, rel=1e-3)


def planner(device: str = "cuda"):
    return lambda job: make_plan(job, device, 2)


def test_auto_picks_ddp_with_the_largest_micro_batch_when_it_fits() -> None:
    job = make_job(["parallelism=auto", "cluster.gpu=h100", "train.global_batch_size=32"])
    chosen, reason = fit.choose(job, planner())
    assert (chosen.parallelism.zero_stage, chosen.parallelism.backend) == (0, "torch")
    assert chosen.train.micro_batch_size == 16 and reason.startswith("ddp with micro batch 16")
    assert "; slower: zero1" in reason  # the same all-reduce, plus ZeRO-1's parameter gather


def test_auto_climbs_the_ladder_only_as_far_as_needed() -> None:
    job = make_job(["model=llama2_7b", "parallelism=auto", "cluster.gpu=a100_80gb",
                    "cluster.gpus_per_node=8", "precision=bf16", "data.seq_len=2048",
                    "train.global_batch_size=64"])
    chosen, reason = fit.choose(job, planner())
    plan = make_plan(chosen, "cuda", 2)
    assert plan.fits and chosen.parallelism.zero_stage >= 1 and "ddp" in reason
    cheaper = fit._variant(job, "torch", chosen.parallelism.zero_stage - 1, False, 1, 1, 1)
    assert make_plan(cheaper, "cuda", 2).fits is False  # even at micro batch 1


def test_auto_reports_when_nothing_fits_and_needs_a_gpu() -> None:
    huge = make_job(["model=llama3_8b", "parallelism=auto", "cluster.gpu=l4",
                     "cluster.gpus_per_node=1", "data.seq_len=8192"])
    with pytest.raises(ConfigError, match="nothing fits"):
        fit.choose(huge, planner())
    with pytest.raises(ConfigError) as err:
        fit.choose(make_job(["parallelism=auto"]), planner())
    assert err.value.key == "parallelism.auto"


def test_run_that_does_not_fit_is_refused_with_both_numbers(tmp_path) -> None:
    job = make_job(["+recipe=ddp", "model=llama2_7b", "cluster.gpu=h100", "precision=bf16",
                    "cluster.gpus_per_node=8"], run_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError) as err:
        execute(job, Hardware(cuda_devices=8, bf16_supported=True))
    msg = str(err.value)
    assert "GiB/GPU >" in msg and "(h100)" in msg and "fits at" in msg
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_plan_action_on_a_cluster_we_do_not_have(tmp_path) -> None:
    proc = run_ok(["+recipe=fsdp_zero3", "model=llama2_7b", "cluster.nodes=8",
                    "cluster.gpus_per_node=8", "cluster.gpu=h100", "action=plan"], tmp_path)
    import json

    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["world_size"] == 64 and plan["backend"] == "nccl" and len(plan["commands"]) == 8
    assert plan["fits"] is True and plan["compute"]["gpu_hours"] > 0
    assert plan["memory"]["activations_bytes"] > 0 and plan["memory"]["zero_paper_bytes"] > 0
    assert "peak per rank" in proc.stdout and "fits" in proc.stdout


@pytest.mark.parametrize("model", ["t5_base", "bert_base", "llama3_8b"])
def test_every_family_plans_and_validates_for_training(model: str) -> None:
    """Each family is a valid training job, planned at what fp32 AdamW on one rank holds:
    4 bytes of weights, 4 of gradients and 8 of Adam's moments per published parameter."""
    job = make_job([f"model={model}", "data.seq_len=128", "parallelism=ddp",
                    "cluster.gpus_per_node=1"])
    validate(job, Hardware())
    plan = make_plan(job, "cpu", 2)
    assert plan.memory.peak_bytes == pytest.approx(16 * PUBLISHED[model], rel=1e-5)


def test_lora_and_dpo_flops_per_token() -> None:
    """LoRA skips the frozen weights' gradients (4N + 2T); DPO sends both answers through the
    policy and, forward only, the reference: 2·(6N + 12Lhs + 2N + 4Lhs)."""
    kw = {"global_batch": 8, "seq_len": 128, "steps": 1, "layers": 4, "d_model": 256}
    attention = 12 * 4 * 256 * 128
    lora = compute.estimate(params=10**6, trainable_params=10**4, **kw)
    assert lora.flops_per_token == pytest.approx(4e6 + 2e4 + attention)
    dpo = compute.estimate(params=10**6, reference=True, **kw)
    assert dpo.flops_per_token == pytest.approx(2 * (6e6 + attention + 2e6 + attention / 3))


def test_auto_keeps_replicate_degree_only_on_rungs_that_shard() -> None:
    job = make_job(["model=llama2_7b", "parallelism=auto", "cluster.gpu=a100_80gb",
                    "cluster.nodes=2", "cluster.gpus_per_node=8", "precision=bf16",
                    "data.seq_len=2048", "train.global_batch_size=64",
                    "parallelism.replicate_degree=2", "action=plan"])
    variants = {(label, c.parallelism.zero_stage): c.parallelism.replicate_degree
                for label, c in fit.candidates(job)}
    assert variants[("ddp", 0)] == variants[("zero1", 1)] == 1
    assert variants[("fsdp_zero2", 2)] == variants[("fsdp_zero3", 3)] == 2
    assert variants[("deepspeed_zero3_offload", 3)] == 2
    chosen, _ = fit.choose(job, planner())
    validate(chosen, Hardware())  # whatever rung wins is a valid job
    plan = make_plan(chosen, "cuda", 2)
    assert plan.fits and (chosen.parallelism.replicate_degree == 2) == (
        chosen.parallelism.zero_stage >= 2)
