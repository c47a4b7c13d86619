"""LR schedule, secret redaction and the plan's launch commands."""

from __future__ import annotations

import math

import pytest

from orchestrator.loop import lr_at
from orchestrator.plan import make_plan
from orchestrator.redact import REDACTED, redact
from tests.conftest import make_job


def test_lr_warms_up_then_decays_to_the_floor() -> None:
    job = make_job(["optim.lr=0.01", "optim.warmup_steps=4", "train.steps=20"])
    o = job.optim
    assert lr_at(1, o, 20) == pytest.approx(0.0025)
    assert lr_at(4, o, 20) == pytest.approx(0.01)
    assert lr_at(20, o, 20) == pytest.approx(0.01 * o.min_lr_ratio)
    values = [lr_at(s, o, 20) for s in range(4, 21)]
    assert values == sorted(values, reverse=True) and all(math.isfinite(v) for v in values)


def test_secrets_are_redacted_but_lookalikes_are_not() -> None:
    out = redact({"wandb": {"api_key": "k-123"}, "hf_token": "t", "tokenizer": "bpe",
                  "tokens_per_s": 3, "env": {"WANDB_API_KEY": "x", "PATH": "/bin"}})
    assert out["wandb"]["api_key"] == REDACTED and out["hf_token"] == REDACTED
    assert out["env"]["WANDB_API_KEY"] == REDACTED and out["env"]["PATH"] == "/bin"
    assert out["tokenizer"] == "bpe" and out["tokens_per_s"] == 3


def test_plan_commands_are_torchrun_for_many_ranks_and_direct_for_one() -> None:
    two = make_plan(make_job(["+recipe=ddp"], run_dir="/r/a"), "cpu", cpu_count=2)
    (cmd,) = two.commands
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nnodes=1"]
    assert "--nproc-per-node=2" in cmd and cmd[-3:] == ["-m", "recipes.pretrain",
                                                       "/r/a/config.yaml"]
    one = make_plan(make_job(["cluster.gpus_per_node=1"], run_dir="/r/b"), "cpu", cpu_count=2)
    assert one.commands == [[one.commands[0][0], "-m", "recipes.pretrain", "/r/b/config.yaml"]]
    multi = make_plan(make_job(["cluster.nodes=2", "action=plan", "launcher.rdzv_port=29611"],
                               run_dir="/r/c"), "cpu", cpu_count=2)
    assert len(multi.commands) == 2
    assert "--node-rank=1" in multi.commands[1]
    assert "--rdzv-endpoint=127.0.0.1:29611" in multi.commands[0]
