"""Secrets (secret-named config keys) never reach a file, a printed plan, a script, a manifest or
an error line; the ranks get them back only through their environment."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.common.errors import ConfigError
from orchestrator.common.secrets import ENV_VAR, REDACTED, secret_env
from orchestrator.config.derived import Hardware
from orchestrator.config.load import config_text, load_job
from orchestrator.planning.plan import make_plan
from orchestrator.planning.preflight import validate
from orchestrator.planning.table import print_plan
from tests.conftest import REPO, make_job

SECRET = "sk_live_9f3c2a7e51"
KEY = f"+parallelism.deepspeed.comet.api_key={SECRET}"
DS = ["+recipe=deepspeed_zero1", KEY]


def ds_job(tmp_path: Path, extra: list[str] | None = None):  # noqa: ANN201 - a JobConfig
    return make_job([*DS, *(extra or [])], run_dir=str(tmp_path / "run"))


def test_plan_json_deepspeed_json_and_printed_plan_hold_no_secret(tmp_path, capsys) -> None:
    job = ds_job(tmp_path)
    plan = make_plan(job, "cpu", 2)
    plan.write(tmp_path / "plan.json")
    written = (tmp_path / "plan.json").read_text()
    assert SECRET not in written
    assert json.loads(written)["deepspeed_config"]["comet"]["api_key"] == REDACTED
    ds_text = plan.deepspeed_json()  # what cli writes to <run_dir>/deepspeed.json
    assert SECRET not in ds_text and json.loads(ds_text)["comet"]["api_key"] == REDACTED
    assert SECRET not in json.dumps(plan.deepspeed_config)  # the Plan itself holds none
    # a secret-named variable slipped into the plan's env is not written either
    dataclasses.replace(plan, env={**plan.env, "WANDB_API_KEY": SECRET}).write(
        tmp_path / "plan2.json")
    assert SECRET not in (tmp_path / "plan2.json").read_text()
    print_plan(plan)
    out = capsys.readouterr().out
    assert "DeepSpeed config" in out and REDACTED in out and SECRET not in out


def test_sbatch_script_holds_no_secret_and_sbatch_gets_them_in_its_env(tmp_path) -> None:
    from orchestrator.launch.slurm import render_script, submit_env

    job = ds_job(tmp_path, ["launcher=slurm", "cluster.nodes=2", "cluster.gpus_per_node=1"])
    plan = dataclasses.replace(make_plan(job, "cpu", 2),
                               env={**make_plan(job, "cpu", 2).env, "HF_TOKEN": SECRET})
    script = render_script(plan, job, cpus=4)
    assert SECRET not in script and "HF_TOKEN" not in script
    assert "export ORCHESTRATOR_DEVICE=cpu" in script  # the other variables still are
    env = submit_env(plan, job)
    assert env["HF_TOKEN"] == SECRET and SECRET in env[ENV_VAR]
    assert env["PATH"] == os.environ["PATH"]  # sbatch exports its whole environment


@pytest.mark.parametrize("api", ["trainjob", "pytorchjob"])
def test_k8s_manifest_holds_no_secret(tmp_path, api) -> None:
    from orchestrator.launch import k8s, trainjob

    job = make_job([*DS, "launcher=k8s", "action=plan", "launcher.k8s.secret=s"],
                   run_dir=str(tmp_path / "runs" / "r1"))
    plan = make_plan(job, "cpu", 2)
    plan = dataclasses.replace(plan, env={**plan.env, "COMET_API_KEY": SECRET})
    text = yaml.safe_dump((trainjob if api == "trainjob" else k8s).render(plan, job))
    assert SECRET not in text and "COMET_API_KEY" not in text


def test_config_errors_never_echo_a_secret() -> None:
    direct = ConfigError("parallelism.deepspeed.comet.api_key", SECRET, "x")
    assert SECRET not in str(direct) and direct.value == REDACTED
    nested = ConfigError("parallelism.deepspeed", {"comet": {"api_key": SECRET, "enabled": 1}},
                         "x")
    assert SECRET not in str(nested) and "'enabled': 1" in str(nested)
    listed = ConfigError("x.items", [{"token": SECRET}], "x")
    assert SECRET not in str(listed)
    plain = ConfigError("train.steps", -1, "a number > 0")
    assert "-1" in str(plain)  # non-secrets are still shown
    # validate: the passthrough without DeepSpeed echoes the whole mapping
    job = make_job([KEY])
    with pytest.raises(ConfigError) as err:
        validate(job, Hardware())
    assert err.value.key == "parallelism.deepspeed" and SECRET not in str(err.value)
    # a key the generated config owns, holding a secret
    job = make_job(["+recipe=deepspeed_zero1",
                    f"+parallelism.deepspeed.optimizer.params.api_key={SECRET}"])
    with pytest.raises(ConfigError) as err:
        validate(job, Hardware())
    assert err.value.key == "parallelism.deepspeed.optimizer" and SECRET not in str(err.value)
    # an unknown secret-named key (config/load.py)
    with pytest.raises(ConfigError) as err:
        make_job([f"+logging.wandb.api_key={SECRET}"])
    assert err.value.key == "logging.wandb.api_key" and SECRET not in str(err.value)


def test_deepspeeds_own_error_message_is_scrubbed() -> None:
    # DeepSpeed's pydantic error quotes the input value: an int api_key is the wrong type
    job = make_job(["+recipe=deepspeed_zero1", "+parallelism.deepspeed.comet.api_key=73914682"])
    with pytest.raises(ConfigError) as err:
        validate(job, Hardware())
    assert "comet.api_key" in str(err.value) and "73914682" not in str(err.value)


def test_secrets_reach_the_rank_only_through_its_environment(tmp_path, monkeypatch) -> None:
    from orchestrator.common.contract import DEEPSPEED_JSON
    from orchestrator.run.strategies.deepspeed import load_config

    job = ds_job(tmp_path)
    run_dir = Path(job.run_dir)
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(config_text(job))  # as the launcher writes it
    (run_dir / DEEPSPEED_JSON).write_text(make_plan(job, "cpu", 2).deepspeed_json())
    for f in run_dir.iterdir():
        assert SECRET not in f.read_text(), f
    env = secret_env(job)
    assert set(env) == {ENV_VAR} and SECRET in env[ENV_VAR]
    assert secret_env(make_job([])) == {}  # no secrets, nothing added
    monkeypatch.delenv(ENV_VAR, raising=False)
    bare = load_job(run_dir / "config.yaml")
    assert bare.parallelism.deepspeed["comet"]["api_key"] == REDACTED
    monkeypatch.setenv(ENV_VAR, env[ENV_VAR])
    rank_job = load_job(run_dir / "config.yaml")  # what a rank does
    assert rank_job.parallelism.deepspeed["comet"]["api_key"] == SECRET
    assert rank_job == job
    # the DeepSpeed rank's config: the file's, with the secret put back
    config = load_config(rank_job)
    assert config["comet"]["api_key"] == SECRET
    assert {k: v for k, v in config.items() if k != "comet"} == {
        k: v for k, v in json.loads((run_dir / DEEPSPEED_JSON).read_text()).items() if k != "comet"}


def test_deepspeed_logging_of_its_config_is_scrubbed(caplog, capfd) -> None:
    import logging

    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger

    from orchestrator.run.strategies.deepspeed import _scrub_logs

    before = list(logger.filters)
    level = logger.level
    try:
        logger.setLevel(logging.INFO)
        _scrub_logs({"comet": {"api_key": SECRET}})
        cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
               "comet": {"api_key": SECRET}}
        DeepSpeedConfig(cfg).print("DeepSpeedEngine configuration")  # what rank 0 logs
    finally:
        logger.filters[:] = before
        logger.setLevel(level)
    out = "".join(capfd.readouterr()) + caplog.text  # DeepSpeed's handler, and propagated
    assert '"comet"' in out and REDACTED in out and SECRET not in out


def test_cli_plan_writes_and_prints_no_secret(tmp_path) -> None:
    """The whole `action=plan` (DeepSpeed, Slurm script): no file in the run dir, and nothing
    on stdout or stderr, holds the secret."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "orchestrator", "action=plan", *DS, "launcher=slurm",
           "cluster.nodes=2", "cluster.gpus_per_node=1", f"hydra.run.dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [f for f in run_dir.rglob("*") if f.is_file()]
    names = {f.name for f in files}
    assert {"config.yaml", "plan.json", "deepspeed.json", "job.sbatch",
            "overrides.txt"} <= names, names
    for f in files:
        assert SECRET.encode() not in f.read_bytes(), f
    assert SECRET not in proc.stdout and SECRET not in proc.stderr
    assert REDACTED in (run_dir / "config.yaml").read_text()
