"""First contact, round 2 (issue 25): what a CPU can show of the GPU paths' defects, and what a
new user tripped on. The rest is in scripts/gpu_check.sh."""

from __future__ import annotations

import dataclasses
import re
import sysconfig

import pytest

from orchestrator.common.errors import ConfigError, OrchestratorError
from orchestrator.config.derived import Hardware, missing_build_tool
from orchestrator.config.launcher import check_torch_version
from orchestrator.planning.plan import make_plan
from orchestrator.planning.preflight import validate
from orchestrator.run.metrics import MetricsLogger
from tests.conftest import make_job

H100 = ["cluster.device=cuda", "cluster.gpu=h100", "cluster.gpus_per_node=8", "action=plan"]


@pytest.mark.parametrize("task", ["evaluate", "generate", "quantize"])
def test_only_training_draws_a_progress_bar(tmp_path, task) -> None:
    job = make_job([f"+recipe={task}", "logging=none", "logging.progress=true"],
                   run_dir=str(tmp_path))
    logger = MetricsLogger(job)
    assert logger.bar is None  # an event is all these log: no dead "train: 0%" bar
    logger.close()
    train = MetricsLogger(dataclasses.replace(job, train=dataclasses.replace(job.train,
                                                                             task="pretrain")))
    assert train.bar is not None
    train.close()


@pytest.mark.parametrize(("version", "ok"), [("2.8.1", False), ("2.6.0+cu124", False),
                                             ("2.9.0", True), ("2.13.0+cpu", True),
                                             ("3.0.0a0", True)])
def test_torchrun_flags_need_torch_2_9(version, ok) -> None:
    if ok:
        check_torch_version(version)
        return
    with pytest.raises(OrchestratorError, match=rf"^torch {re.escape(version)} here; "
                       r"orchestrator needs torch >= 2\.9: every launch passes torchrun "
                       r"--signals-to-handle"):
        check_torch_version(version)


def test_fp8_needs_a_token_count_divisible_by_16() -> None:
    llama = ["+recipe=fsdp_zero3", "model=llama_tiny", "precision=fp8", *H100]
    validate(make_job([*llama, "train.micro_batch_size=4", "data.seq_len=64"]), Hardware())
    with pytest.raises(ConfigError, match=r"'train.micro_batch_size' has value 3; allowed: a "
                       r"value whose product with data.seq_len is a multiple of 16 with "
                       r"precision=fp8 \(here 63 tokens\)"):
        validate(make_job([*llama, "train.micro_batch_size=3", "data.seq_len=21"]), Hardware())


def test_background_checkpoints_are_written_without_the_overlapping_loader(tmp_path) -> None:
    """The writer DCP's async_save gets: no copy-ahead, so no CUDA stream on GPU 0."""
    from orchestrator.run.strategies.base import background_writer

    writer = background_writer(tmp_path)
    assert writer.per_thread_copy_ahead == 0 and writer.thread_count == 1


def test_compile_and_cpu_adam_need_their_build_tools_on_any_device(monkeypatch) -> None:
    run = ["action=run", "launcher=local"]
    compile_gpu = ["+recipe=fsdp_zero3", "train.compile=true", "cluster.device=cuda",
                   "cluster.gpus_per_node=1", *run]
    gpu = Hardware(cuda_devices=1, bf16_supported=True, capability=(9, 0))
    validate(make_job(compile_gpu), gpu)  # this machine has gcc and Python.h
    monkeypatch.setenv("CC", "no-such-cc")
    with pytest.raises(ConfigError, match=r"'train.compile' .*allowed: false here: Triton's "
                       r"CUDA launcher need a C compiler \(\$CC, else gcc or clang\): "
                       r"no-such-cc is not on PATH"):
        validate(make_job(compile_gpu), gpu)
    monkeypatch.setenv("CXX", "no-such-c++")
    with pytest.raises(ConfigError, match=r"'parallelism.offload_optimizer' .*DeepSpeed's CPU "
                       r"Adam is built on first use and needs a C\+\+ compiler"):
        validate(make_job(["+recipe=deepspeed_zero3_offload", *run]), Hardware())
    monkeypatch.delenv("CC")
    monkeypatch.delenv("CXX")
    include = sysconfig.get_paths()
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {**include, "include": "/nowhere"})
    assert missing_build_tool("c").startswith("Python's headers: /nowhere/Python.h is missing")


@pytest.mark.parametrize("model", ["gpt2", "llama2_7b"])
def test_flops_per_token_charge_no_matmul_for_lookups(model) -> None:
    """6·(N − lookup embeddings) + 12·L·d·s per token (PaLM appendix B; torchtitan): GPT-2's
    position table is a lookup and its tied token embedding is the head's matmul; Llama-2's
    untied input embedding is a lookup."""
    job = make_job([f"model={model}", "+recipe=ddp", "data.seq_len=1024", *H100])
    plan = make_plan(job, "cuda", 8)
    n_layer, d, s = job.model.n_layer, job.model.d_model, 1024
    lookup = {"gpt2": job.model.max_seq_len * d, "llama2_7b": job.model.vocab_size * d}[model]
    assert plan.compute.params == {"gpt2": 124_439_808, "llama2_7b": 6_738_415_616}[model]
    want = 6 * (plan.compute.params - lookup) + 12 * n_layer * d * s
    assert plan.compute.flops_per_token == want
    assert plan.compute.chinchilla_tokens == 20 * plan.compute.params  # every parameter


@pytest.mark.parametrize(("env", "want"), [
    ({"NCCL_SOCKET_IFNAME": "ib0,eth0"}, {"GLOO_SOCKET_IFNAME": "ib0,eth0"}),
    ({"NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "eth1"}, {}),  # the user's own
    ({"NCCL_SOCKET_IFNAME": "^docker,lo"}, {}),  # NCCL's exclude form: no gloo equivalent
    ({}, {}),
])
def test_gloo_side_groups_use_the_interfaces_nccl_is_told_to(env, want) -> None:
    from orchestrator.run.distributed import gloo_interface

    assert gloo_interface(env) == want
