"""The error contract at the command line: what Hydra itself rejects (a bad override value, an
unknown key or group option, a YAML syntax error, a run dir that cannot be made) is one line and
exit 2 like our own ConfigError, and a refused launch leaves no run dir behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# In-process: Hydra's exception for these, turned into the line the CLI prints.
COMPOSED = {
    "not an integer": (["train.steps=2.5"], "Error merging override train.steps=2.5: "
                       "Value '2.5' of type 'float' could not be converted to Integer"),
    "typo without +": (["train.stepz=3"], "Could not override 'train.stepz'. To append "
                       "to your config use +train.stepz=3: Key 'stepz' not in 'TrainConfig'"),
    "unknown option": (["model=nope"], "Could not find 'model/nope'; available options "
                       "in 'model': bert_base, bert_tiny, gpt2, "),
    "unknown recipe": (["+recipe=nope"], "Could not find 'recipe/nope'; available "
                       "options in 'recipe': causal_lm, ddp, "),
}


@pytest.mark.parametrize("case", COMPOSED)
def test_hydra_refusals_become_one_line(case: str) -> None:
    from hydra import compose, initialize_config_module

    from orchestrator.cli import hydra_error_line

    overrides, want = COMPOSED[case]
    with initialize_config_module("configs", version_base="1.3"), \
            pytest.raises(Exception) as info:
        compose("config", overrides=overrides)
    line = hydra_error_line(info.value)
    assert "\n" not in line and line.startswith(want), line


# Through the CLI, as users meet them (exit code, one stderr line, no run dir).
CASES = {
    "wrong type": (["train.steps=abc"], "error: Error merging override train.steps=abc: "
                   "Value 'abc' of type 'str' could not be converted to Integer"),
    "yaml syntax": (["--config-dir", "{tmp}/conf", "+recipe=broken"],
                    "error: YAML syntax error in {tmp}/conf/recipe/broken.yaml, line 3, "
                    "column 4: while parsing a flow sequence expected ',' or ']', but got ':'"),
    "uncreatable run dir": (["hydra.run.dir=/proc/orchestrator-test/run"],
                            "error: cannot create the run directory (hydra.run.dir): No such "
                            "file or directory: /proc/orchestrator-test"),
    "secret in a typo": (["logging.wandb.api_key=sk_TOPSECRET"],
                         "error: Could not override 'logging.wandb.api_key'. To append to your "
                         "config use +logging.wandb.api_key=***REDACTED***: Key 'api_key' not "
                         "in 'WandbConfig'"),
    "our own check": (["train.steps=0"], "error: config key 'train.steps' has value 0; "
                      "allowed: a number > 0"),
    "tensor parallel on BERT": (["model=bert_tiny", "parallelism.tensor_parallel=2"],
                                "error: config key 'parallelism.tensor_parallel' has value 2; "
                                "allowed: 1 for model.family=bert (tensor parallelism is built "
                                "for: llama, gpt2)"),
    "context parallel on CPU": (
        ["model=llama_tiny", "parallelism.context_parallel=2", "parallelism.zero_stage=3"],
        "error: config key 'parallelism.context_parallel' has value 2; allowed: 1 on cpu (ring "
        "attention runs on CUDA's fused SDPA kernels, flash, memory-efficient or cuDNN; torch "
        "has no context-parallel path for CPU attention)"),
    "stages x TP beyond the world": (
        ["model=llama_tiny", "model.n_layer=4", "parallelism.pipeline_parallel=2",
         "parallelism.tensor_parallel=2", "train.micro_batch_size=8"],
        "error: config key 'parallelism.pipeline_parallel' has value 2; allowed: a divisor of "
        "the world size 2 / parallelism.tensor_parallel 2 (nodes x gpus_per_node; each stage "
        "runs on world / pipeline_parallel ranks)"),
    "profile past the run": (["train.profile.steps=[5,30]"], "error: config key "
                             "'train.profile.steps' has value [5, 30]; allowed: [first, last] "
                             "with 1 <= first <= last <= train.steps=20 (steps first..last "
                             "are profiled)"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_no_run_dir(tmp_path: Path, case: str) -> None:
    (tmp_path / "conf" / "recipe").mkdir(parents=True)
    (tmp_path / "conf" / "recipe" / "broken.yaml").write_text("train:\n  steps: [1, 2\n  x: : 1\n")
    args, want = CASES[case]
    out = subprocess.run([sys.executable, "-m", "orchestrator",
                          *[a.format(tmp=tmp_path) for a in args]],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(want.format(tmp=tmp_path)), out.stderr
    assert "TOPSECRET" not in out.stdout + out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf"]  # no runs/<dir> left
