"""Evaluation during training (`eval.every_steps`): the config checks, the held-out loss against
a plain cross-entropy over the same samples, and training that is bit-identical with and
without it (one rank, in-process: no torchrun)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from orchestrator.common.errors import ConfigError
from orchestrator.common.records import read_metrics
from orchestrator.config.derived import Hardware
from orchestrator.config.schema import JobConfig
from orchestrator.data import batches, build_dataset, split
from orchestrator.models.build import build_model
from orchestrator.planning.preflight import validate
from orchestrator.run import loop
from orchestrator.run.evaluation import evaluate_during_training
from orchestrator.run.metrics import MetricsLogger, NullLogger
from orchestrator.run.setup import setup
from tests.conftest import make_job, run_cli
from tests.unit.test_loop import CountingEngine, Recorder

BAD = [
    (["eval.every_steps=-1"], "eval.every_steps", "a number >= 0"),
    (["eval.every_steps=5"], "eval.holdout", "with eval.every_steps=5"),
    (["eval.every_steps=5", "eval.holdout=0.1", "+recipe=dpo"], "eval.every_steps",
     "0 for DPO"),
    (["eval.every_steps=5", "+recipe=evaluate"], "eval.every_steps",
     "0 for train.task=evaluate"),
    (["eval.max_batches=0"], "eval.max_batches", "a number > 0"),
]


@pytest.mark.parametrize(("overrides", "key", "allowed"), BAD, ids=[k for _, k, _ in BAD])
def test_bad_eval_config_names_the_key(overrides: list[str], key: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(make_job(overrides), Hardware(cuda_devices=0))
    assert err.value.key == key
    assert allowed in err.value.allowed and "\n" not in str(err.value)


@pytest.mark.parametrize("recipe", ["ddp", "masked_lm", "span_corruption"])
def test_every_steps_with_a_holdout_is_valid(recipe: str) -> None:
    job = make_job([f"+recipe={recipe}", "eval.every_steps=5", "eval.holdout=0.1"])
    validate(job, Hardware(cuda_devices=0))
    assert make_job([]).eval.every_steps == 0  # the default: off


def test_cli_refuses_every_steps_without_a_holdout_in_one_line(tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(["+recipe=ddp", "eval.every_steps=5"], run_dir)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: config key 'eval.holdout' has value 0.0; allowed: a fraction in (0, 1) with "
        "eval.every_steps=5 (the held-out share evaluated during training, e.g. "
        "eval.holdout=0.1), or set eval.path"]
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_the_loop_evaluates_every_n_steps_on_logged_steps(one_rank_group) -> None:
    job = make_job(["train.steps=10", "train.log_every=4", "optim.warmup_steps=0",
                    "eval.every_steps=5", "eval.holdout=0.1"])
    calls: list[int] = []
    engine, logger = CountingEngine(), Recorder()

    def evaluate() -> dict[str, float]:
        calls.append(engine.calls)
        return {"val/loss": 0.5 * engine.calls, "val/perplexity": math.exp(0.5 * engine.calls)}

    losses = loop.train(loop.Training(engine, job, logger, 1, 8, evaluate=evaluate),
                        itertools.repeat({}))
    assert losses == [float(i) for i in range(1, 11)]
    assert calls == [5, 10]  # not at step 0, and after the step's update
    assert [step for step, _ in logger.rows] == [4, 5, 8, 10]  # eval steps are logged steps
    val = {step: m["val/loss"] for step, m in logger.rows if "val/loss" in m}
    assert val == {5: 2.5, 10: 5.0}
    assert all(m["loss"] == step for step, m in logger.rows)


def test_val_loss_joins_the_step_record_and_the_progress_line(tmp_path) -> None:
    logger = MetricsLogger(make_job(["logging=none", "train.steps=10"], str(tmp_path)))
    logger.log(4, {"loss": 2.5})
    logger.log(5, {"loss": 2.0, "val/loss": 1.5, "val/perplexity": math.exp(1.5)})
    logger.progress(5, 2.0, 1000.0)
    assert logger.bar is not None and "val_loss=1.5000" in logger.bar.postfix
    logger.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 4, "loss": 2.5},
        {"step": 5, "loss": 2.0, "val/loss": 1.5, "val/perplexity": math.exp(1.5)}]


def tiny_job(extra: list[str], run_dir: str = "/nonexistent/run") -> JobConfig:
    """A tiny GPT-2 with dropout (so the RNG matters) on 64 synthetic samples, 16 held out."""
    return make_job(["model.n_layer=1", "model.d_model=32", "model.n_head=2",
                     "model.vocab_size=64", "model.max_seq_len=16", "model.dropout=0.1",
                     "data.seq_len=16", "data.num_samples=64", "train.micro_batch_size=4",
                     "eval.holdout=0.25", "optim.warmup_steps=0", *extra], run_dir)


def test_held_out_loss_matches_a_plain_cross_entropy(one_rank_group) -> None:
    job = tiny_job(["eval.max_batches=3", "eval.every_steps=1"])
    engine = setup(build_model(job.model, seed=job.train.seed), job, "cpu")
    rng = torch.get_rng_state()
    result = evaluate_during_training(engine, split(build_dataset(job), 0.25)[1], job, 0, 1)
    assert torch.equal(torch.get_rng_state(), rng)  # no draw from the training stream
    assert all(m.training for m in engine.model.modules())  # back in train mode

    # Independently: samples 48..59 (the last quarter, 3 micro batches of 4), no dropout,
    # next-token cross-entropy averaged over every predicted token.
    dataset = build_dataset(job)
    ids = torch.stack([dataset[i]["input_ids"] for i in range(48, 60)])
    model = engine.hf_model().eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               ids[:, 1:].reshape(-1)).item()
    assert result["val/loss"] == pytest.approx(expected, rel=1e-5)
    assert result["val/perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    hits = (logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean().item()
    assert result["val/accuracy"] == pytest.approx(hits, abs=1e-7)
    assert set(result) == {"val/loss", "val/perplexity", "val/accuracy"}


def train_losses(every_steps: int, run_dir: Path
                 ) -> tuple[list[float], list[tuple[int, dict[str, float]]]]:
    """The real DDP engine (one rank) trained 6 steps from the same seed."""
    job = tiny_job(["train.steps=6", f"eval.every_steps={every_steps}"], str(run_dir))
    torch.manual_seed(job.train.seed)  # as build_for_rank leaves it
    engine = setup(build_model(job.model, seed=job.train.seed), job, "cpu")
    train_set, held_out = split(build_dataset(job), job.eval.holdout)
    logger = Recorder() if every_steps else NullLogger()

    def evaluate() -> dict[str, float]:
        return evaluate_during_training(engine, held_out, job, 0, 1)

    run = loop.Training(engine, job, logger, 1, 4, evaluate=evaluate if every_steps else None)
    losses = loop.train(run, batches(train_set, job, 0, 1))
    return losses, getattr(logger, "rows", [])


def test_training_is_bit_identical_with_and_without_evaluation(one_rank_group,
                                                              tmp_path) -> None:
    plain, _ = train_losses(0, tmp_path)  # (the memory probe writes to the run dir)
    evaluated, rows = train_losses(3, tmp_path)
    assert evaluated == plain  # exactly: dropout draws the same masks, the data is the same
    val = [(step, m["val/loss"]) for step, m in rows if "val/loss" in m]
    assert [step for step, _ in val] == [3, 6]
    assert val[1][1] < val[0][1] < math.log(64) + 1  # it learns; an untrained model is ~ln V
