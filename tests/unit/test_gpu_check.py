"""scripts/gpu_check.sh, planned on this CPU machine: every run it makes on a GPU is a valid
config and plans a one-GPU NCCL job, so the first GPU run spends its minutes training, not on
a typo. (The script itself is run where a GPU is lent; see docs/benchmarks.md.)"""

from __future__ import annotations

import json
import os
import subprocess

from tests.conftest import REPO

RUNS = ["ddp-bf16", "ddp-fp16", "fsdp_zero3-bf16", "fsdp_zero3-fp16", "deepspeed_zero3-bf16",
        "deepspeed_zero3-fp16", "deepspeed_zero3_offload-bf16", "save-fsdp_zero3-bf16",
        "evaluate-fsdp_zero3", "generate-fsdp_zero3", "resume-fsdp_zero3-bf16",
        "async-checkpoint-fsdp_zero3-bf16", "profile-fsdp_zero3-bf16", "compile-fsdp_zero3-bf16",
        "workers-ddp-bf16",
        "llama-fsdp_zero3-bf16", "llama-fsdp_zero3-fp8", "llama-fsdp_zero3-fp8-all_gather",
        "llama-ddp-fp8", "quantize-int8-fp32"]


def test_gpu_check_runs_are_valid_one_gpu_nccl_plans(tmp_path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(out)], cwd=REPO, text=True,
                          capture_output=True, timeout=600,
                          env={**os.environ, "ORCHESTRATOR_GPU_CHECK_DRY": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "dry-model")
    assert runs == sorted([*RUNS, "llama-tp2-bf16", "gpt2-tp2-bf16", "llama-pp2-bf16",
                           "llama-pp2-fsdp2-bf16", "llama-cp2-bf16", "llama-pp2-tp2-bf16"])
    pp = json.loads((out / "llama-pp2-bf16" / "plan.json").read_text())
    assert (pp["strategy"], pp["world_size"], pp["pipeline"]["stages"]) == ("pipeline", 2, 2)
    pp = json.loads((out / "llama-pp2-fsdp2-bf16" / "plan.json").read_text())
    assert (pp["world_size"], pp["mesh"]) == (4, "pp 2 x 1 replica x 2 shards")
    cp = json.loads((out / "llama-cp2-bf16" / "plan.json").read_text())
    assert (cp["strategy"], cp["comm_bytes"]["cp"] > 0) == ("context_parallel", True)
    pptp = json.loads((out / "llama-pp2-tp2-bf16" / "plan.json").read_text())
    assert pptp["mesh"] == "pp 2 x 1 replica x tp 2 (sequence parallel)"
    tp = json.loads((out / "llama-tp2-bf16" / "plan.json").read_text())
    assert (tp["backend"], tp["world_size"], tp["tensor_parallel"]) == ("nccl", 2, 2)
    assert tp["mesh"] == "1 replica x tp 2 (sequence parallel)"
    gpt2 = json.loads((out / "gpt2-tp2-bf16" / "plan.json").read_text())
    assert gpt2["mesh"] == tp["mesh"]
    for name in RUNS:
        assert (out / name / "status").read_text().strip() == "0", (
            out / f"{name}.log").read_text()[-2000:]
        plan = json.loads((out / name / "plan.json").read_text())
        assert (plan["device"], plan["backend"], plan["world_size"]) == ("cuda", "nccl", 1)
        last = name.removesuffix("-all_gather").rsplit("-", 1)[1]
        precision = last if last in ("bf16", "fp16", "fp8", "fp32") else "bf16"
        assert (plan["gpu"], plan["precision"]) == ("h100", precision)
    offload = json.loads((out / "deepspeed_zero3_offload-bf16" / "plan.json").read_text())
    zero = offload["deepspeed_config"]["zero_optimization"]
    assert zero["overlap_comm"] and zero["offload_optimizer"]["pin_memory"]
    assert int(offload["env"]["OMP_NUM_THREADS"]) == os.cpu_count()  # CPU Adam gets the cores
    assert "| deepspeed_zero3-fp16 | 0 |" in (out / "table.md").read_text()
    # an NCCL timeout aborts the process: its flight record is dumped into the run dir
    env = json.loads((out / "ddp-bf16" / "plan.json").read_text())["env"]
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == str(out / "ddp-bf16" / "nccl_trace_rank_")
    gathered = json.loads((out / "llama-fsdp_zero3-fp8-all_gather" / "plan.json").read_text())
    plain = json.loads((out / "llama-fsdp_zero3-fp8" / "plan.json").read_text())
    assert gathered["memory"]["working_set_bytes"] < plain["memory"]["working_set_bytes"]


def test_gpu_check_fails_when_a_run_fails(tmp_path) -> None:
    """Its exit status is honest: a run that fails (here every one: a bad learning rate added
    to each) makes the script exit non-zero, after the table."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(out)], cwd=REPO, text=True,
                          capture_output=True, timeout=600,
                          env={**os.environ, "ORCHESTRATOR_GPU_CHECK_DRY": "1",
                               "ORCHESTRATOR_GPU_CHECK_EXTRA": "optim.lr=-1"})
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert f"gpu_check: {len(RUNS) + 6} failed (runs or the gpu tests)" in proc.stderr
    assert (out / "table.md").is_file()


def test_the_table_fails_a_deepspeed_zero3_run_above_its_planned_peak(tmp_path) -> None:
    """gpu_table.py exits 1 (and gpu_check counts it) when a DeepSpeed ZeRO-3 run's measured
    device peak exceeds the plan's, allowance included; other strategies are only tabulated."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_table", "scripts/gpu_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    for name, strategy, peak in [("ds_ok", "deepspeed", 90), ("fsdp_over", "fsdp2", 500)]:
        run = tmp_path / name
        run.mkdir()
        (run / "status").write_text("0\n")
        (run / "plan.json").write_text(json.dumps({"strategy": strategy, "zero_stage": 3,
                                                   "memory": {"peak_total_bytes": 100}}))
        (run / "metrics.jsonl").write_text(json.dumps(
            {"step": 1, "loss": 1.0, "tokens_per_s": 1.0, "peak_mem_bytes": peak}) + "\n")
    assert table.main(str(tmp_path)) == 0
    over = tmp_path / "ds_over"
    over.mkdir()
    for f in ("status", "plan.json"):
        (over / f).write_text((tmp_path / "ds_ok" / f).read_text())
    (over / "metrics.jsonl").write_text(json.dumps(
        {"step": 1, "loss": 1.0, "tokens_per_s": 1.0, "peak_mem_bytes": 101}) + "\n")
    assert table.over_plan(over) == "ds_over: measured peak 0.00 GiB > planned 0.00"
    assert table.main(str(tmp_path)) == 1
