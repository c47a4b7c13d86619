"""The generated DeepSpeed config passes DeepSpeed's own config model; bad passthrough is caught."""

from __future__ import annotations

import json

import pytest

from orchestrator.common.errors import ConfigError
from orchestrator.config.derived import Hardware, resolve_batch
from orchestrator.planning import deepspeed_config
from orchestrator.planning.preflight import validate
from tests.conftest import make_job, run_cli, run_ok

DS = ["parallelism.backend=deepspeed"]


@pytest.mark.parametrize("parallelism", ["ddp", "zero1", "zero2", "zero3"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_generated_config_round_trips_through_deepspeed(parallelism: str, precision: str) -> None:
    job = make_job([f"parallelism={parallelism}", f"precision={precision}", *DS,
                    "train.global_batch_size=16"])
    if parallelism == "ddp" and precision != "fp32":  # refused: config/precision.py says why
        with pytest.raises(ConfigError, match="stage-0 fp16/bf16 optimizer wrapper"):
            validate(job, Hardware())
        return
    validate(job, Hardware(cpu_fp16=True))  # the config, whatever this CPU runs
    accum, global_batch = resolve_batch(job)
    cfg = deepspeed_config.generate(job, accum, global_batch)
    deepspeed_config.check(json.loads(json.dumps(cfg)))  # as written to deepspeed.json
    assert cfg["zero_optimization"]["stage"] == job.parallelism.zero_stage
    assert (cfg["train_batch_size"], cfg["gradient_accumulation_steps"]) == (16, 2)
    assert ("fp16" in cfg, "bf16" in cfg) == (precision == "fp16", precision == "bf16")
    # DeepSpeed's own bucket size (this model's blocks are smaller), on CPU too
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    assert cfg["zero_optimization"]["reduce_bucket_size"] == \
        DeepSpeedZeroConfig().reduce_bucket_size


def test_offload_and_passthrough_are_merged() -> None:
    job = make_job(["+recipe=deepspeed_zero3_offload",
                    "+parallelism.deepspeed.zero_optimization.overlap_comm=true",
                    "+parallelism.deepspeed.activation_checkpointing.partition_activations=false"])
    validate(job, Hardware())
    cfg = deepspeed_config.generate(job, *resolve_batch(job))
    zero = cfg["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["overlap_comm"] is True and zero["stage"] == 3
    assert cfg["activation_checkpointing"] == {"partition_activations": False}


@pytest.mark.parametrize(("overrides", "key"), [
    (["+parallelism.deepspeed.trian_batch_size=3"], "parallelism.deepspeed.trian_batch_size"),
    (["+parallelism.deepspeed.zero_optimization.stagee=2"], "parallelism.deepspeed"),
    (["+parallelism.deepspeed.gradient_clipping=2.0"], "parallelism.deepspeed.gradient_clipping"),
    (["+parallelism.deepspeed.zero_optimization.stage=1"],
     "parallelism.deepspeed.zero_optimization.stage"),
    (["parallelism.offload_params=true", "parallelism=zero2"], "parallelism.offload_params"),
])
def test_bad_deepspeed_settings_are_rejected_by_key(overrides: list[str], key: str) -> None:
    job = make_job(["+recipe=deepspeed_zero3", *overrides])
    with pytest.raises(ConfigError) as err:
        validate(job, Hardware())
    assert err.value.key == key


def test_offload_without_deepspeed_is_rejected() -> None:
    with pytest.raises(ConfigError) as err:
        validate(make_job(["+recipe=fsdp_zero3", "parallelism.offload_optimizer=true"]),
                 Hardware())
    assert err.value.key == "parallelism.offload_optimizer"


def test_an_optimizer_offloaded_from_gpus_takes_only_the_fused_kernel() -> None:
    """On GPUs an offloaded AdamW steps with DeepSpeed's CPU Adam (a fused kernel): another
    `optim.implementation` would be ignored there, so it is refused."""
    gpus = ["+recipe=deepspeed_zero3_offload", "cluster.device=cuda"]
    validate(make_job(gpus), Hardware(cuda_devices=2))  # fused, the default
    with pytest.raises(ConfigError) as err:
        validate(make_job([*gpus, "optim.implementation=foreach"]), Hardware(cuda_devices=2))
    assert err.value.key == "optim.implementation"
    validate(make_job(["+recipe=deepspeed_zero3_offload", "optim.implementation=foreach"]),
             Hardware())  # on CPU the offloaded optimizer is torch's: the kernel is chosen


def test_unknown_passthrough_key_fails_before_launch(tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(["+recipe=deepspeed_zero2", "+parallelism.deepspeed.zero_optimisation={}"],
                   run_dir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "parallelism.deepspeed.zero_optimisation" in proc.stderr
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_action_plan_shows_and_writes_the_deepspeed_config(tmp_path) -> None:
    proc = run_ok(["+recipe=deepspeed_zero3", "action=plan"], tmp_path)
    assert "DeepSpeed config (deepspeed.json)" in proc.stdout
    written = json.loads((tmp_path / "deepspeed.json").read_text())
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert written == plan["deepspeed_config"] and plan["strategy"] == "deepspeed"
    assert not (tmp_path / "metrics.jsonl").exists()


def test_gpu_config_uses_deepspeed_defaults_raised_to_a_block_and_cpu_keeps_small_buckets() -> None:
    """On GPUs: overlapped communication, DeepSpeed's own bucket defaults (read from its config
    model, not typed here) or one transformer block where that is larger, pinned offload."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    defaults = DeepSpeedZeroConfig()
    for model, block in [("gpt2", 7_087_872), ("llama3_8b", 218_112_000)]:
        job = make_job(["+recipe=deepspeed_zero3_offload", f"model={model}",
                        "cluster.device=cuda", "cluster.gpu=h100", "cluster.gpus_per_node=8",
                        "action=plan"])
        validate(job, Hardware())
        assert deepspeed_config.largest_block(job) == block  # 12d² + 13d (gpt2), Llama 3 8B
        gpu = deepspeed_config.generate(job, *resolve_batch(job), "cuda")
        zero = gpu["zero_optimization"]
        assert zero["overlap_comm"] is True
        assert zero["reduce_bucket_size"] == max(defaults.reduce_bucket_size, block)
        assert zero["stage3_prefetch_bucket_size"] == max(defaults.prefetch_bucket_size, block)
        assert zero["stage3_prefetch_bucket_size"] >= block  # at least one whole layer
        assert zero["stage3_param_persistence_threshold"] == defaults.param_persistence_threshold
        assert "stage3_max_live_parameters" not in zero  # DeepSpeed's 1e9
        assert zero["offload_optimizer"]["pin_memory"] and zero["offload_param"]["pin_memory"]
        deepspeed_config.check(json.loads(json.dumps(gpu)))
        cpu = deepspeed_config.generate(job, *resolve_batch(job), "cpu")["zero_optimization"]
        # CPU: the same defaults (the fastest measured there too); only pinning differs
        assert {k: v for k, v in cpu.items() if "offload" not in k} == {
            k: v for k, v in zero.items() if "offload" not in k}
        assert not cpu["offload_optimizer"]["pin_memory"]


def test_hsdp_maps_to_deepspeed_hierarchical_partitioning() -> None:
    job = make_job(["+recipe=deepspeed_zero3", "cluster.nodes=2", "cluster.gpus_per_node=4",
                    "parallelism.replicate_degree=2", "launcher=slurm"])
    validate(job, Hardware())
    zero = deepspeed_config.generate(job, *resolve_batch(job))["zero_optimization"]
    assert zero["zero_hpz_partition_size"] == 4
    flat = make_job(["+recipe=deepspeed_zero3"])
    assert "zero_hpz_partition_size" not in deepspeed_config.generate(
        flat, *resolve_batch(flat))["zero_optimization"]


def test_the_jit_cache_is_keyed_by_the_torch_version_and_the_interpreter(
        tmp_path, monkeypatch) -> None:
    """Two virtualenvs (or torch versions) on one machine get their own DeepSpeed op builds."""
    from importlib.metadata import version
    from pathlib import Path

    from orchestrator.planning.plan import extensions_dir, make_plan

    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path))
    job = make_job(["+recipe=deepspeed_zero3"])
    validate(job, Hardware())
    cache = Path(make_plan(job, "cpu", 2, python="/venvs/a/bin/python").env[
        "TORCH_EXTENSIONS_DIR"])
    assert cache.parent == tmp_path / "torch_extensions"
    assert cache.name.startswith(f"torch-{version('torch')}-")
    assert cache == extensions_dir("/venvs/a/bin/python")
    assert extensions_dir("/venvs/b/bin/python") != cache
    assert extensions_dir("/venvs/a/bin/python", "2.99.0") != cache
