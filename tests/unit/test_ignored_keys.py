"""A key the user sets either takes effect or is refused (issue 24): every key of the schema is
classified (read always, refused elsewhere, or read under a condition), and each conditional
key set where it is not read is refused in one line, or named in a warning."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.common.errors import ConfigError
from orchestrator.config.derived import Hardware
from orchestrator.config.schema import JobConfig
from orchestrator.planning.ignored import ALWAYS, CHECKED, READERS
from orchestrator.planning.preflight import validate
from tests.conftest import make_job, run_cli

EVALUATE = ["+recipe=evaluate", "cluster.gpus_per_node=1"]
# For each conditional key: a job where it is not read, with the key set to a non-default
# value (the last override).
NOT_READ = {
    "step": ["step=5"],
    "resume": [*EVALUATE, "resume=never"],
    "lora.alpha": ["lora.alpha=8"], "lora.dropout": ["lora.dropout=0.1"],
    "lora.target_modules": ["lora.target_modules=[c_attn]"],
    "precision.init_scale": ["precision=bf16", "precision.init_scale=1024"],
    "precision.growth_interval": ["precision.growth_interval=10"],
    "precision.fp8_filter": ["precision.fp8_filter=all"],
    "parallelism.bucket_cap_mb": ["+recipe=fsdp_zero3", "parallelism.bucket_cap_mb=50"],
    "parallelism.tp_across_nodes": ["parallelism.tp_across_nodes=true"],
    "parallelism.pipeline_schedule": ["parallelism.pipeline_schedule=gpipe"],
    "parallelism.pipeline_microbatches": ["parallelism.pipeline_microbatches=4"],
    "parallelism.pipeline_stages_per_rank": ["parallelism.pipeline_stages_per_rank=2"],
    "data.path": ["data.path=/tmp/x.txt"], "data.cache_dir": ["data.cache_dir=/tmp/c"],
    "data.num_proc": ["data.num_proc=2"], "data.text_field": ["data.text_field=body"],
    "data.on_error": ["data.on_error=skip"],
    "data.num_samples": ["data=text", "data.num_samples=100"],
    "data.branching": ["data=text", "data.branching=8"],
    **{k: [*EVALUATE, f"{k}={v}"] for k, v in {
        "train.steps": 7, "train.grad_clip": 0.5, "train.log_every": 2,
        "train.stop_on_nonfinite": "false", "train.grad_accum_steps": 2,
        "train.global_batch_size": 4, "train.activation_checkpointing": "true",
        "optim.name": "sgd", "optim.lr": 0.1, "optim.weight_decay": 0.1,
        "optim.schedule": "constant", "optim.warmup_steps": 0, "optim.min_lr_ratio": 0.5,
        "optim.implementation": "foreach",
        "checkpoint.every_steps": 2, "debug.crash_at_step": 3, "debug.step_delay_s": 0.5,
        "debug.memory_probe_step": 3, "train.save_model": "false",
        "train.profile.steps": "[1,2]"}.items()},
    "train.profile.memory": ["train.profile.memory=true"],
    "optim.beta1": ["optim.name=sgd", "optim.beta1=0.8"],
    "optim.beta2": ["optim.name=sgd", "optim.beta2=0.9"],
    "optim.eps": ["optim.name=sgd", "optim.eps=1e-6"],
    "optim.momentum": ["optim.momentum=0.5"],
    "checkpoint.keep_last": ["checkpoint.keep_last=5"],
    "checkpoint.async_save": ["+recipe=fsdp_zero3", "checkpoint.async_save=true"],
    "debug.crash_mode": ["debug.crash_mode=sigkill"], "debug.crash_rank": ["debug.crash_rank=1"],
    "objective.mlm_probability": ["objective.mlm_probability=0.3"],
    "objective.noise_density": ["objective.noise_density=0.3"],
    "objective.mean_span_length": ["objective.mean_span_length=2"],
    "objective.dpo_beta": ["objective.dpo_beta=0.5"],
    "generate.prompts": ["generate.prompts=[Hi]"], "generate.max_new_tokens": [
        "generate.max_new_tokens=8"], "generate.temperature": ["generate.temperature=0"],
    "generate.top_k": ["generate.top_k=5"], "generate.top_p": ["generate.top_p=0.5"],
    "eval.holdout": ["data=text", "eval.path=PATH", "eval.holdout=0.1"],
    "eval.max_batches": ["eval.max_batches=5"],
    "search.params": ["+search.params.optim.lr='choice(0.1, 0.2)'"],
    "search.trials": ["search.trials=3"], "search.parallel": ["search.parallel=2"],
    "search.metric": ["search.metric=loss"], "search.direction": ["search.direction=maximize"],
    "search.sampler": ["search.sampler=random"], "search.study": ["search.study=s1"],
    "search.pruner": ["search.pruner=none"], "search.warmup_trials": ["search.warmup_trials=4"],
    "search.name": ["search.name=mine"],
    "search.storage": ["search.storage=sqlite:///s.db"],
    "search.budget_gpu_hours": ["search.budget_gpu_hours=10"],
    "search.objective": ["search.objective=throughput"], "search.layouts": ["search.layouts=[ddp]"],
    "search.device_memory_mb": ["search.device_memory_mb=100"],
    "format": ["format=gguf"], "dtype": ["dtype=f16"], "quant": ["quant=q8_0"],
}
WARNED_ONLY = {"launcher.rdzv_host": "launcher.rdzv_host=10.0.0.1",
               "launcher.rdzv_port": "launcher.rdzv_port=29600",
               "launcher.rdzv_timeout_s": "launcher.rdzv_timeout_s=60",
               "launcher.slurm.time": "launcher.slurm.time=02:00:00",
               "launcher.image": "launcher.image=me/img:1",
               "logging.wandb.project": "logging.wandb.project=other"}


def leaves(obj: object, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        out += leaves(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else \
            [prefix + f.name]
    return out


def test_every_key_of_the_schema_is_classified_once() -> None:
    conditional = [k for r in READERS for k in r.keys]
    places = [*ALWAYS, *CHECKED, *conditional]
    assert sorted(places) == sorted(set(places)), "a key classified twice"
    assert set(places) == set(leaves(JobConfig())), "a key nobody says is read or refused"


def test_every_refusing_reader_key_has_a_case_here() -> None:
    refusing = {k for r in READERS if not r.warn for k in r.keys}
    warned = {k for r in READERS if r.warn for k in r.keys}
    assert refusing == set(NOT_READ)
    assert set(WARNED_ONLY) <= warned


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("paths")
    (root / "eval.txt").write_text("held-out words " * 40)
    return {"PATH": str(root / "eval.txt")}


@pytest.mark.parametrize("key", sorted(NOT_READ))
def test_a_key_set_where_it_is_not_read_is_refused(key, paths) -> None:
    overrides = [o.replace("PATH", paths["PATH"]) for o in NOT_READ[key]]
    with pytest.raises(ConfigError) as e:
        validate(make_job(overrides), Hardware())
    assert str(e.value).startswith(f"config key '{key}' has value ")
    assert "(the default) unless " in str(e.value) and str(e.value).endswith("is not read here")


@pytest.mark.parametrize("key", sorted(WARNED_ONLY))
def test_a_launcher_or_logger_key_for_another_one_is_named_in_a_warning(key, capsys) -> None:
    validate(make_job([WARNED_ONLY[key]]), Hardware())  # launcher=local, W&B offline
    if key.startswith("logging."):
        assert capsys.readouterr().err == ""  # read: W&B is on
        validate(make_job(["logging=none", WARNED_ONLY[key]]), Hardware())
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {key}=") and "is not read: it applies with" in err
    assert err.count("\n") == 1


def test_run_dir_with_a_new_run_is_refused_on_the_command_line(tmp_path) -> None:
    proc = run_cli(["action=plan", f"run_dir={tmp_path / 'elsewhere'}"], tmp_path / "run")
    assert proc.returncode == 2
    assert proc.stderr == (f"error: config key 'run_dir' has value '{tmp_path / 'elsewhere'}'; "
                           "allowed: unset for action=plan (a run goes to hydra.run.dir); "
                           "run_dir names an earlier run for action=status|cancel|export|"
                           "report\n")
    assert not (tmp_path / "run").exists() and not (tmp_path / "elsewhere").exists()


def test_architecture_keys_a_model_directory_overrides_are_named(tmp_path) -> None:
    from orchestrator.planning.ignored import _shape_warnings

    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_layer": 4, "n_embd": 64, '
                                          '"n_head": 4, "vocab_size": 512}')
    job = make_job([f"model.pretrained_path={tmp_path}"])  # model=gpt2_tiny: 2 layers
    assert _shape_warnings(job) == [f"warning: model.n_layer=2 is not read: {tmp_path} has 4 "
                                    "(n_layer in its config.json), which the model is built with"]
    assert _shape_warnings(make_job([f"model.pretrained_path={tmp_path}",
                                     "model.n_layer=4"])) == []
