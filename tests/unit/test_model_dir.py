"""model.pretrained_path: a real saved Hugging Face model directory is accepted; one that asks
for remote code, or whose config.json or safetensors files are damaged, is refused before
anything launches, with one ConfigError line naming the file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.common.errors import ConfigError
from orchestrator.config.derived import Hardware
from orchestrator.models.build import build_model
from orchestrator.models.check import check_model_dir
from orchestrator.planning.preflight import validate
from tests.conftest import REPO, make_job

KEY = "model.pretrained_path"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny GPT-2 saved by transformers itself (config.json + model.safetensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("models") / "tiny"
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=256)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


@pytest.fixture
def model_dir(saved, tmp_path) -> Path:
    """A fresh copy to damage."""
    return Path(shutil.copytree(saved, tmp_path / "model"))


def refused(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        check_model_dir(str(path))
    assert err.value.key == KEY and "\n" not in str(err.value)
    return str(err.value)


def test_a_saved_model_passes_and_validate_accepts_it(model_dir) -> None:
    assert (model_dir / "model.safetensors").exists()
    check_model_dir(str(model_dir))
    validate(make_job([f"{KEY}={model_dir}"]), Hardware())


def test_auto_map_is_refused_and_never_executed(model_dir, tmp_path) -> None:
    marker = tmp_path / "executed"
    (model_dir / "evil_model.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil_model.EvilConfig",
                       "AutoModelForCausalLM": "evil_model.EvilModel"}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    msg = refused(model_dir)
    assert "auto_map" in msg and str(model_dir / "config.json") in msg
    with pytest.raises(ConfigError):
        validate(make_job([f"{KEY}={model_dir}"]), Hardware())
    # the loaders never run the directory's code either (trust_remote_code=False): the config
    # names a model type transformers ships, so it loads that class instead
    job = make_job([f"{KEY}={model_dir}"])
    model = build_model(job.model, seed=0)
    assert type(model).__name__ == "GPT2LMHeadModel" and not marker.exists()


def test_corrupt_config_json_names_the_file_and_position(model_dir) -> None:
    text = (model_dir / "config.json").read_text()
    (model_dir / "config.json").write_text(text[: len(text) // 2])
    msg = refused(model_dir)
    assert str(model_dir / "config.json") in msg and "line" in msg and "column" in msg
    (model_dir / "config.json").write_text("[1, 2]")
    assert "JSON object" in refused(model_dir)


def test_truncated_safetensors_is_refused(model_dir) -> None:
    weights = model_dir / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size - 100)  # an interrupted copy: header whole, data short
    msg = refused(model_dir)
    assert str(weights) in msg and "truncated" in msg
    os.truncate(weights, 20)  # cut inside the header
    assert "truncated" in refused(model_dir)
    os.truncate(weights, 3)  # not even the header length
    assert "truncated" in refused(model_dir)


def test_garbage_safetensors_header_is_refused(model_dir) -> None:
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff" * 8  # the JSON header starts with garbage
    weights.write_bytes(bytes(data))
    assert str(weights) in refused(model_dir)


def test_missing_shard_is_refused(model_dir) -> None:
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00002.safetensors")
    assert "model-00002-of-00002.safetensors is missing" in refused(model_dir)


def test_pytorch_bin_only_directory_is_accepted(model_dir) -> None:
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"not inspected")
    check_model_dir(str(model_dir))


def test_cli_refuses_auto_map_in_one_line_without_prompting(model_dir, tmp_path) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil_model.EvilConfig"}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "orchestrator", "action=validate", f"{KEY}={model_dir}",
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error:") and KEY in line and "auto_map" in line, line
