"""LR schedule, secret redaction, the plan's launch commands and the sweep summary."""

from __future__ import annotations

import json
import math

import pytest

from orchestrator.common.secrets import REDACTED, redact
from orchestrator.planning.plan import make_plan
from orchestrator.reports.sweep import SUMMARY_JSON, summarize
from orchestrator.run.loop import lr_at
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


def test_sweep_summary_names_the_point_with_the_lowest_final_loss(tmp_path) -> None:
    """Not the first point, nor the one whose curve dips lowest on the way; a point without
    metrics is listed but never best."""
    curves = {"0": [5.0, 3.0, 4.0], "1": [5.0, 4.5, 3.5], "2": [6.0, 5.0, 4.5], "3": None}
    for name, values in curves.items():
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "plan.json").write_text("{}")
        if values is not None:
            (run_dir / "metrics.jsonl").write_text("".join(
                json.dumps({"step": i, "loss": v, "tokens_per_s": 100.0}) + "\n"
                for i, v in enumerate(values, 1)))
    summarize(tmp_path)
    summary = json.loads((tmp_path / SUMMARY_JSON).read_text())
    assert summary["best"] == "1"
    assert [p["final_loss"] for p in summary["points"]] == [4.0, 3.5, 4.5, None]
    assert "best: point 1 " in (tmp_path / "sweep_summary.md").read_text()
