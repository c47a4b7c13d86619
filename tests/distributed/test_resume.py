"""Checkpoints and resume (issue 12): a run killed mid-way and resumed — by torchrun's restart
or by a new launch at another world size and strategy — continues exactly where it was. The
expected losses are the stored 2-rank reference, which a plain single-process PyTorch loop
reproduces (tests/distributed/test_reference_loop.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.common.records import read_metrics
from tests.conftest import REPO, make_job, run_cli, run_ok
from tests.distributed.checks import RESTARTED, assert_resumed_once, losses, reference_losses, until

QUIET = ["logging=none", "train.save_model=false"]


def steps(run_dir: Path) -> list[int]:
    return [m["step"] for m in read_metrics(run_dir / "metrics.jsonl")]


def test_a_rank_killed_after_an_async_checkpoint_resumes_exactly_under_fsdp2(
        tmp_path: Path) -> None:
    """FSDP2 with checkpoint.async_save: each checkpoint (every 4 steps) is written in the
    background and committed at a later step, once every rank is done. Rank 1 dies by SIGKILL
    at step 14; torchrun restarts both ranks once; they resume from the newest checkpoint
    committed by then (step 12's if its files were written by step 13's end, else step 8's)
    and the losses are the uninterrupted run's (FSDP2 differs from the reference by 4.8e-7
    uninterrupted too). DDP, ZeRO-1 and DeepSpeed ZeRO-2 restart with synchronous saves: the
    shared runs of test_strategies.py and test_deepspeed.py."""
    proc = run_ok(["+recipe=fsdp_zero3", *QUIET, *RESTARTED, "checkpoint.async_save=true"],
                   tmp_path)
    (said,) = [line for line in proc.stdout.splitlines() if line.startswith("resumed from")]
    resumed = int(said.split("(step ")[1].rstrip(")"))
    assert resumed in (8, 12)
    assert said == f"resumed from {tmp_path / 'checkpoints' / f'step-{resumed:08d}'} " \
        f"(step {resumed})"
    assert_resumed_once(tmp_path)
    assert losses(tmp_path) == pytest.approx(reference_losses(), abs=1e-6)
    # in the background: each commit of the second attempt is logged after a later step's
    # record than its own (a synchronous save is committed before the loop goes on; the first
    # attempt's later records were dropped on resume), and the loop waited for part of it
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    commits = [(i, r) for i, r in enumerate(records)
               if r.get("event") == "checkpoint" and r["step"] > resumed]
    assert [r["step"] for _, r in commits] == list(range(resumed + 4, 21, 4))
    for i, commit in commits:
        assert any(r.get("step", 0) > commit["step"] and "loss" in r for r in records[:i]) \
            or commit["step"] == 20  # the last one is committed when the loop ends
        assert 0 < commit["blocked_s"] <= commit["save_s"]


def test_a_zero3_checkpoint_resumes_at_world_4_under_zero2_and_world_1_under_ddp(
        tmp_path: Path) -> None:
    """Saved sharded by FSDP2 ZeRO-3 on 2 ranks; loaded by FSDP2 ZeRO-2 on 4 ranks (micro batch
    2) and, whole, by DDP on 1 rank (micro batch 8), both with the same global batch: the run
    goes on from step 10 as if nothing had changed."""
    first = run_cli(["+recipe=fsdp_zero3", *QUIET, "checkpoint.every_steps=10",
                     "debug.crash_at_step=11"], tmp_path)
    assert first.returncode == 2 and "InjectedCrash" in first.stderr
    # the same shards at world 4 under FSDP2 ZeRO-2 (micro batch 2), from a run dir of its own
    saved = tmp_path / "checkpoints" / "step-00000010"
    run_ok(["+recipe=fsdp_zero2", *QUIET, "cluster.gpus_per_node=4",
                     "train.micro_batch_size=2", f"resume={saved}"], tmp_path / "world4")
    assert steps(tmp_path / "world4") == list(range(11, 21))
    assert losses(tmp_path / "world4")[0] == pytest.approx(reference_losses()[10], abs=1e-5)
    assert losses(tmp_path / "world4") == pytest.approx(reference_losses()[10:], abs=1e-4)
    second = run_ok(["+recipe=ddp", "logging=none", "checkpoint.every_steps=10",
                      "cluster.gpus_per_node=1", "train.micro_batch_size=8"], tmp_path)
    assert steps(tmp_path) == list(range(1, 21))
    # what the resumed launch changed is said and recorded
    assert "; changed since: cluster.gpus_per_node 2 -> 1, " in second.stdout
    start = [e for e in read_metrics(tmp_path / "metrics.jsonl", events=True)
             if e["event"] == "start"][-1]
    assert start["resumed_step"] == 10 and start["changed"]["cluster.gpus_per_node"] == [2, 1]
    assert start["changed"]["train.micro_batch_size"] == [4, 8]
    got, want = losses(tmp_path), reference_losses()
    assert got[:10] == want[:10]  # the first launch's, kept
    assert got[10] == pytest.approx(want[10], abs=1e-5)  # the first resumed step
    assert got == pytest.approx(want, abs=1e-4)  # summed in another order from there on
    # export: the newest checkpoint (step 20) as a Hugging Face model equals the trained one;
    # step 10's, saved as FSDP2 shards on 2 ranks, consolidates too
    from transformers import AutoModelForCausalLM

    from orchestrator.run.checkpoint.export import export

    for extra in ([], ["step=10"]):  # what `action=export` runs, in this process
        export(make_job(["action=export", f"run_dir={tmp_path}", *extra]))

    ids = torch.arange(32).view(2, 16)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    exported = AutoModelForCausalLM.from_pretrained(
        tmp_path / "export" / "step-00000020" / "model").eval()
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, trained(ids).logits, atol=1e-5)
    assert (tmp_path / "export" / "step-00000010" / "model" / "config.json").exists()


def test_usr1_checkpoints_and_stops_the_job_and_the_same_command_resumes(tmp_path: Path) -> None:
    """`kill -USR1 <launcher>`: torchrun passes it on to both ranks, which agree to stop after
    the same step, save that step's checkpoint and exit; the launcher says where and exits
    128+SIGUSR1. The same command resumes from it, and the 20 losses are the uninterrupted
    reference exactly (DDP)."""
    cmd = [sys.executable, "-m", "orchestrator", "+recipe=ddp", *QUIET, "debug.step_delay_s=0.4",
           f"hydra.run.dir={tmp_path}", "logging.progress=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        until(lambda: (tmp_path / "metrics.jsonl").exists() and len(steps(tmp_path)) >= 3, 120,
              "the third step")
        os.kill(proc.pid, signal.SIGUSR1)
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGUSR1, err[-3000:]
    (said,) = [line for line in out.splitlines() if line.startswith("stopped by SIGUSR1")]
    step = int(said.split()[5].rstrip(";"))
    assert 3 <= step < 20  # stopped early, after the step the ranks agreed on
    checkpoint = tmp_path / "checkpoints" / f"step-{step:08d}"
    assert said == (f"stopped by SIGUSR1 after step {step}; checkpoint: {checkpoint}; to resume, "
                    f"run the same command with hydra.run.dir={tmp_path}")
    assert steps(tmp_path) == list(range(1, step + 1))
    assert not (tmp_path / "attempt.json").exists()  # reported once, by the launcher
    # the same command resumes; a USR1 once the last step is logged (no vote after it) is
    # noted by the ranks, which finish; torchrun then exits 1, and the launcher says done
    again = subprocess.Popen([c for c in cmd if c != "train.save_model=false"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        until(lambda: steps(tmp_path)[-1:] == [20], 120, "the last step")
        os.kill(again.pid, signal.SIGUSR1)
        out, err = again.communicate(timeout=180)
    finally:
        again.kill()
    assert again.returncode == 0, err[-3000:]
    assert f"resumed from {checkpoint} (step {step})" in out
    assert f"done. run dir: {tmp_path}" in out and (tmp_path / "model").is_dir()
    assert steps(tmp_path) == list(range(1, 21))
    assert losses(tmp_path) == reference_losses()
