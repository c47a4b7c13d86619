"""Bad configs are rejected before anything starts: key, value and what is allowed."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.common.errors import ConfigError
from orchestrator.config.derived import Hardware, resolve_batch
from orchestrator.planning.preflight import validate
from tests.conftest import make_job, run_cli, run_ok

BAD = [
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=-0.001"], "optim.lr"),
    (["parallelism.zero_stage=4"], "parallelism.zero_stage"),
    (["precision.name=fp8"], "precision.name"),
    (["train.global_batch_size=10"], "train.global_batch_size"),
    (["train.global_batch_size=16", "train.grad_accum_steps=3"], "train.grad_accum_steps"),
    (["+train.stesp=5"], "train.stesp"),
    (["+foo=1"], "foo"),
    (["model.n_head=5"], "model.n_head"),
    (["data.seq_len=4096"], "data.seq_len"),
    (["logging.wandb.mode=cloud"], "logging.wandb.mode"),
    (["cluster.gpus_per_node=0"], "cluster.gpus_per_node"),
    (["train.steps=0"], "train.steps"),
    (["optim.warmup_steps=50"], "optim.warmup_steps"),
    (["data=text", "data.path=/nonexistent/corpus.txt"], "data.path"),
    (["cluster.device=cuda"], "cluster.device"),
    (["model.family=gpt3"], "model.family"),
    (["optim.beta2=1.5"], "optim.beta2"),
    (["+recipe=fsdp_zero3", "precision=fp16", "optim.implementation=fused"],
     "optim.implementation"),
    (["action=launch"], "action"),
    (["debug.crash_rank=5"], "debug.crash_rank"),
    (["debug.step_delay_s=-1"], "debug.step_delay_s"),
    (["+recipe=zero1", "checkpoint.async_save=true"], "checkpoint.async_save"),
    (["+recipe=deepspeed_zero2", "checkpoint.async_save=true"], "checkpoint.async_save"),
    (["fault.stop_timeout_s=0"], "fault.stop_timeout_s"),
    (["launcher.slurm.signal=TERM@60"], "launcher.slurm.signal"),  # torchrun's own stop
    (["launcher.slurm.signal=USR1"], "launcher.slurm.signal"),  # no lead time
    (["launcher.slurm.signal='USR1@90; touch x'"], "launcher.slurm.signal"),
    (["launcher=slurm", "launcher.slurm.time=00:02:00"], "launcher.slurm.signal"),  # 120 s
    (["lora.rank=-1"], "lora.rank"),
    (["lora.rank=4", "lora.target_modules=[c_attn,qkv]"], "lora.target_modules"),
    (["lora.rank=4", "lora.target_modules=[ln_1]"], "lora.target_modules"),  # a LayerNorm
    (["lora.rank=4", "lora.dropout=1"], "lora.dropout"),
    (["lora.rank=4", "+recipe=evaluate"], "lora.rank"),
    (["+recipe=dpo", "model=bert_tiny"], "model.family"),  # DPO needs a causal LM
    (["objective.name=dpo"], "objective.name"),  # ... and preference pairs
    (["+recipe=dpo", "objective.dpo_beta=0"], "objective.dpo_beta"),
    (["+recipe=fsdp_zero3", "parallelism.replicate_degree=3"], "parallelism.replicate_degree"),
    (["+recipe=fsdp_zero3", "parallelism.replicate_degree=0"], "parallelism.replicate_degree"),
    (["+recipe=zero1", "parallelism.replicate_degree=2"], "parallelism.replicate_degree"),
    (["+recipe=deepspeed_zero2", "parallelism.replicate_degree=2"],
     "parallelism.replicate_degree"),
    # several torchrun nodes on a loopback rendezvous: each would host its own store
    (["launcher=torchrun", "cluster.nodes=2"], "launcher.rdzv_host"),
    (["launcher=torchrun", "cluster.nodes=2", "launcher.rdzv_host=localhost"],
     "launcher.rdzv_host"),
    (["launcher=torchrun", "cluster.nodes=2", "launcher.rdzv_host=127.0.1.1"],
     "launcher.rdzv_host"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD, ids=[k for _, k in BAD])
def test_bad_config_names_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(make_job(overrides), Hardware(cuda_devices=0))
    assert err.value.key == key
    assert f"'{key}'" in str(err.value) and "allowed:" in str(err.value)


def test_cli_rejects_bad_config_without_traceback_or_launch(tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(["+recipe=ddp", "optim.lr=-1"], run_dir)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: config key 'optim.lr' has value -1.0; allowed: a number > 0"]
    # Nothing was planned or launched: no plan, no config, no metrics, no W&B run.
    assert not run_dir.exists() or not any(run_dir.iterdir())


@pytest.mark.parametrize(("override", "key"), [("train.steps=abc", "train.steps"),
                                               ("train.stesp=5", "train.stesp")])
def test_cli_rejects_type_errors_and_unknown_keys(tmp_path, override: str, key: str) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli([override], run_dir)
    assert proc.returncode != 0
    assert key in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_action_validate_writes_nothing(tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = run_ok(["+recipe=fsdp_zero3", "action=validate"], run_dir)
    assert "config OK" in proc.stdout
    assert not run_dir.exists() or not any(run_dir.iterdir())


BASE = make_job(["+recipe=ddp"])
FUZZED_KEYS = {"optim.lr", "train.steps", "parallelism.zero_stage", "train.micro_batch_size",
               "train.global_batch_size", "train.grad_accum_steps", "optim.warmup_steps",
               "cluster.gpus_per_node", "debug.crash_rank"}


@settings(max_examples=300, deadline=None, derandomize=True)  # a failure reproduces
@given(
    lr=st.floats(allow_nan=True, allow_infinity=True, width=32),
    steps=st.integers(-3, 40),
    stage=st.integers(-2, 5),
    micro=st.integers(-2, 9),
    global_batch=st.one_of(st.none(), st.integers(-4, 80)),
    accum=st.one_of(st.none(), st.integers(-2, 6)),
    warmup=st.integers(-2, 45),
    gpus=st.integers(-1, 5),
)
def test_fuzzed_numbers_are_accepted_consistently_or_rejected_by_key(
        lr, steps, stage, micro, global_batch, accum, warmup, gpus) -> None:
    job = dataclasses.replace(
        BASE,
        optim=dataclasses.replace(BASE.optim, lr=lr, warmup_steps=warmup),
        train=dataclasses.replace(BASE.train, steps=steps, micro_batch_size=micro,
                                  global_batch_size=global_batch, grad_accum_steps=accum),
        parallelism=dataclasses.replace(BASE.parallelism, zero_stage=stage),
        cluster=dataclasses.replace(BASE.cluster, gpus_per_node=gpus),
    )
    try:
        validate(job, Hardware())
    except ConfigError as e:
        assert e.key in FUZZED_KEYS, e
        assert e.key in str(e)
        return
    # Accepted: every invariant the launch relies on holds.
    assert lr > 0 and steps >= 1 and 0 <= stage <= 3 and micro >= 1 and gpus >= 1
    assert 0 <= warmup < steps or warmup == 0
    accum_steps, gbs = resolve_batch(job)
    assert gbs == micro * accum_steps * job.world_size
    assert global_batch is None or global_batch == gbs


def test_cli_rejects_loopback_rendezvous_for_many_torchrun_nodes(tmp_path) -> None:
    proc = run_cli(["+recipe=ddp", "launcher=torchrun", "cluster.nodes=2"], tmp_path / "run")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: config key 'launcher.rdzv_host' has value '127.0.0.1'")
    assert not (tmp_path / "run" / "plan.json").exists()


def test_one_torchrun_node_may_use_loopback_and_a_real_host_is_accepted() -> None:
    validate(make_job(["launcher=torchrun", "cluster.nodes=1"]), Hardware())
    validate(make_job(["launcher=torchrun", "cluster.nodes=2", "launcher.rdzv_host=node-0"]),
             Hardware())


GPU_JOB = ["+recipe=fsdp_zero3", "cluster.gpu=h100", "cluster.gpus_per_node=8", "cluster.nodes=2",
           "precision=bf16"]


@pytest.mark.parametrize("launcher", ["slurm", "torchrun"])
def test_remote_gpu_job_is_checked_against_the_target_not_this_cpu_host(launcher: str) -> None:
    from orchestrator.config.derived import resolve_device

    extra = ["launcher.rdzv_host=node-0"] if launcher == "torchrun" else []
    for device in ("cuda", "auto"):  # auto: cluster.gpu names a GPU
        job = make_job([*GPU_JOB, f"launcher={launcher}", f"cluster.device={device}", *extra])
        validate(job, Hardware(cuda_devices=0))  # no "no CUDA device here"
        assert resolve_device(job, Hardware(cuda_devices=0)) == "cuda"


def test_local_launcher_still_checks_this_host_and_ignores_its_gpus_for_remote_auto() -> None:
    from orchestrator.config.derived import resolve_device

    with pytest.raises(ConfigError) as err:
        validate(make_job(["cluster.device=cuda"]), Hardware(cuda_devices=0))
    assert err.value.key == "cluster.device"
    with pytest.raises(ConfigError) as err:
        validate(make_job(["cluster.device=cuda", "cluster.gpus_per_node=4"]),
                 Hardware(cuda_devices=2, bf16_supported=True))
    assert err.value.key == "cluster.gpus_per_node"
    # a GPU on the submitting host does not make a remote CPU job a GPU job
    job = make_job(["launcher=slurm"])
    assert resolve_device(job, Hardware(cuda_devices=8)) == "cpu"
    assert resolve_device(make_job([]), Hardware(cuda_devices=8)) == "cuda"


def test_slurm_time_limits_in_seconds() -> None:
    from orchestrator.config.launcher import slurm_seconds

    assert [slurm_seconds(t) for t in ("90", "1:30", "01:00:00", "2-0", "2-01:30", "1-0:0:5",
                                       "UNLIMITED", "1:2:3:4")] == [
        5400, 90, 3600, 172800, 178200, 86405, None, None]
