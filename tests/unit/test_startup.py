"""Start-up (issue 14): planning and validating a job import neither torch nor transformers once
the model's parameter shapes are cached on disk, and that cache holds exactly what the meta
device counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from orchestrator.models import spec_cache as specs
from orchestrator.models.build import param_specs
from tests.conftest import REPO, make_job

PROBE = """
import sys
from orchestrator.cli import run
sys.argv = ["orchestrator", "+recipe=" + sys.argv[2], "model=gpt2_small_cpu", "action=plan",
            "hydra.run.dir=" + sys.argv[1]]
try:
    run()  # what python -m orchestrator runs
except SystemExit as e:
    assert not e.code, e.code
print({m for m in ("torch", "transformers", "peft", "deepspeed", "matplotlib", "datasets")
       if m in sys.modules})
"""


@pytest.mark.parametrize("recipe", ["fsdp_zero3", "deepspeed_zero3"])
def test_a_plan_imports_no_framework_once_the_shapes_are_cached(tmp_path, recipe) -> None:
    """DeepSpeed's plan too: its generated config is checked without importing deepspeed
    (its own parser runs only on a `parallelism.deepspeed` passthrough)."""
    env = {"ORCHESTRATOR_CACHE": str(tmp_path / "cache")}
    first, again = (subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / f"run{i}"),
                                    recipe],
                                   cwd=REPO, env={**os.environ, **env},
                                   capture_output=True, text=True, timeout=300)
                    for i in range(2))
    assert first.returncode == 0, first.stderr[-2000:]
    assert "'transformers'" in first.stdout.splitlines()[-1]  # counted once on the meta device
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.splitlines()[-1] == "set()"
    assert list((tmp_path / "cache" / "specs").glob("*.json"))


def test_cached_shapes_are_the_meta_device_count_and_keyed_by_versions(
        tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path))
    monkeypatch.setattr(specs, "_SPECS", {})
    job = make_job(["model=llama_tiny", "+recipe=finetune_lora"])
    want = param_specs(job.model, job.lora)
    assert specs.cached_specs(job.model, job.lora) == want  # counted and written
    monkeypatch.setattr(specs, "_SPECS", {})

    def refuse(*_: object) -> None:
        raise AssertionError("counted again instead of read from disk")

    monkeypatch.setattr("orchestrator.models.build.param_specs", refuse)
    assert specs.cached_specs(job.model, job.lora) == want  # read back
    key = specs.spec_key(job.model, job.lora)
    assert json.loads((tmp_path / "specs" / f"{key}.json").read_text())[0][0] == want[0].name
    monkeypatch.setattr(specs, "_version", lambda package: f"{package}-9.9")
    assert specs.spec_key(job.model, job.lora) != key  # another transformers or peft: recount
    with pytest.raises(AssertionError, match="counted again"):
        specs.cached_specs(job.model, job.lora)


LAUNCH = """
import sys
from orchestrator.cli import run
sys.argv = ["orchestrator", "+recipe=ddp", "model=gpt2_tiny", "train.steps=3", "logging=none",
            "logging.progress=false", "train.save_model=false", "hydra.run.dir=" + sys.argv[1]]
try:
    run()  # a real local launch: torchrun and its two ranks import torch, the launcher not
except SystemExit as e:
    assert not e.code, e.code
print({m for m in ("torch", "transformers", "numpy", "deepspeed", "datasets") if m in sys.modules})
"""


def test_the_launcher_of_a_run_imports_no_torch(tmp_path, monkeypatch) -> None:
    """Importing torch in the launcher (e.g. to look for a checkpoint to resume) would add
    seconds before torchrun starts, which imports it anyway."""
    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(specs, "_SPECS", {})  # counted by an earlier test: write it here too
    job = make_job(["model=gpt2_tiny"])
    specs.cached_specs(job.model, job.lora)  # the shapes are cached, as after a first launch
    got = subprocess.run([sys.executable, "-c", LAUNCH, str(tmp_path / "run")], cwd=REPO,
                         env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.splitlines()[-1] == "set()"
    assert (tmp_path / "run" / "metrics.jsonl").exists()
