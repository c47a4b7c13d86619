"""Property test of the error contract: any set of command-line overrides either gives a valid
job or one of the one-line errors the CLI prints with exit 2 — never another exception.

Overrides are composed in-process with Hydra's compose API (no subprocess), exactly as the CLI
composes them, then typed and validated."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException

from orchestrator.cli import compose_job, hydra_error_line
from orchestrator.common.errors import OrchestratorError
from orchestrator.config.derived import Hardware
from orchestrator.planning.preflight import validate

KEYS = ["train.steps", "train.micro_batch_size", "train.global_batch_size", "train.grad_clip",
        "optim.lr", "optim.warmup_steps", "optim.beta2", "optim.name", "model.n_head",
        "model.d_model", "model.n_kv_head", "model.vocab_size", "model.dropout",
        "data.seq_len", "data.name", "data.path", "data.tokenizer", "cluster.gpus_per_node",
        "cluster.nodes", "cluster.device", "cluster.gpu", "parallelism.zero_stage",
        "parallelism.backend", "parallelism.replicate_degree", "precision.name",
        "launcher.name", "launcher.rdzv_port", "lora.rank", "lora.target_modules",
        "generate.top_p", "eval.holdout", "dist.timeout_s", "run.overwrite", "action",
        "train.task", "logging.wandb.tags", "parallelism.deepspeed"]
GROUPS = {"model": ["gpt2_tiny", "llama_tiny", "bert_tiny", "t5_tiny", "gpt2_xl", "nope"],
          "parallelism": ["ddp", "zero1", "fsdp_zero2", "fsdp_zero3", "deepspeed_zero3", "x"],
          "precision": ["fp32", "bf16", "fp16", "bf16_pure", "fp8"],
          "data": ["synthetic", "text", "jsonl_sft", "jsonl_pref", "parquet"],
          "+recipe": ["fsdp_zero3", "dpo", "evaluate", "generate", "finetune_lora", "nope"]}

values = st.one_of(
    st.integers(-(2**40), 2**40).map(str),
    st.sampled_from(["0", "-1", "1", "2", "3", "8", "1e9", "nan", "inf", "-inf", "0.5", "2.5",
                     "true", "false", "null", "[]", "[1,2]", "{}", "{a: 1}", "''", "abc",
                     "${train.steps}", "${nope}", "${oc.env:HOME}", "[", "'a b'",
                     "{api_key: sk_x}", "cuda", "deepspeed", "üñí", "/nonexistent/file"]),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=8),
)
override = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), values),
    st.builds(lambda k, v: f"+{k}={v}", st.sampled_from(["train.stepz", "model.foo", "x"]),
              values),
    st.builds(lambda g, o: f"{g}={o}", st.sampled_from(sorted(GROUPS)),
              st.sampled_from(sorted({o for opts in GROUPS.values() for o in opts}))),
)


@pytest.fixture(scope="module")
def hydra_configs():
    with initialize_config_module("configs", version_base="1.3"):
        yield


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(override, min_size=1, max_size=4))
@example(["data.path=${nope}"])  # resolved only when typed: was a traceback from the CLI
@example(["+parallelism.deepspeed.comet.api_key=sk_x", "parallelism.backend=torch"])
def test_any_overrides_validate_or_give_one_line_errors(hydra_configs, overrides) -> None:
    try:
        cfg = compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:  # Hydra's own refusal: the CLI
        # prints hydra_error_line, exit 2 (anything else raised here is a bug: it fails)
        line = hydra_error_line(e)
        assert line and "\n" not in line, (overrides, line)
        assert "sk_x" not in line
        return
    try:
        validate(compose_job(cfg, "/tmp/orchestrator-fuzz-run"), Hardware())
    except OrchestratorError as e:
        assert str(e) and "\n" not in str(e), (overrides, str(e))
        assert "sk_x" not in str(e)
