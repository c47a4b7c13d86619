#!/usr/bin/env bash
# The GPU check: run where a CUDA GPU is lent (never a CI dependency). One command, a few
# minutes on one H100/H200-class GPU: world size 1 (NCCL) for DDP, FSDP2 ZeRO-3 and DeepSpeed
# ZeRO-3 in bf16 and fp16, DeepSpeed ZeRO-3 with CPU offload (DeepSpeedCPUAdam, pinned memory),
# fp8 (torchao float8) against bf16 on a Llama shape under FSDP2 and DDP, tensor and pipeline
# parallelism (TP=2, PP=2, CP=2 where 2 GPUs are visible, PP=2 x FSDP2 and PP=2 x TP=2 where 4
# are),
# then evaluate and generate on the saved model; prints one table (loss first -> last,
# tokens/s, MFU, planned vs max_memory_allocated peak) and runs the `gpu` tests.
#   bash scripts/gpu_check.sh [OUT_DIR]      (default runs/gpu_check/<time>)
# Each run has a time limit (ORCHESTRATOR_GPU_CHECK_RUN_S, default 240 s); a failed run is a
# FAILED row, and the script goes on to the next. It exits non-zero when any run or gpu test
# failed.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh || exit 1
py="${ORCHESTRATOR_VENV:-.venv}/bin/python"
out="${1:-runs/gpu_check/$(date +%Y%m%d-%H%M%S)}"
limit="${ORCHESTRATOR_GPU_CHECK_RUN_S:-240}"
mkdir -p "$out"
dry=0
if [ "${ORCHESTRATOR_GPU_CHECK_DRY:-0}" = 1 ]; then
  # CPU test of this script (tests/unit/test_gpu_check.py): every run is only planned
  # (action=plan accepts cluster.device=cuda without a GPU), all in one process (see `plan_all`);
  # the saved model is a config.json (beside the run dirs: a run dir holds only its own run)
  gpu=h100 dry=1
  : >"$out/dry_runs.txt"
  # planning only reads config.json; the launch checks want a weights file there too (an
  # empty safetensors file: the dry runs are planned, never loaded)
  "$py" -c "import sys; from transformers import GPT2Config; from safetensors.torch import save_file
GPT2Config().save_pretrained(sys.argv[1]); save_file({}, sys.argv[1] + '/model.safetensors')" \
    "$out/dry-model"
elif ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here" >&2
  exit 2
else
  gpu=$("$py" -c "import torch; from orchestrator.config.gpus import match
p = torch.cuda.get_device_properties(0); print(match(p.name, p.total_memory) or 'none')")
  "$py" -c "import torch, deepspeed; p = torch.cuda.get_device_properties(0)
print(f'gpu_check: {p.name}, {p.total_memory / 2**30:.1f} GiB reported, cluster.gpu=$gpu,'
      f' torch {torch.__version__}, CUDA {torch.version.cuda}, deepspeed {deepspeed.__version__}')" \
    | tee "$out/device.txt"
fi

common=(model=gpt2 data=text data.seq_len=1024 train.micro_batch_size=8 train.steps=30
        train.log_every=5 cluster.device=cuda cluster.gpus_per_node=1 "cluster.gpu=$gpu"
        logging=none logging.progress=false train.save_model=false)

# ORCHESTRATOR_GPU_CHECK_EXTRA: overrides added to every run (space-separated)
read -r -a extra <<<"${ORCHESTRATOR_GPU_CHECK_EXTRA:-}"
run() {  # run NAME OVERRIDES...: one orchestrator run into $out/NAME
  local name=$1; shift
  set -- "$@" ${extra[@]+"${extra[@]}"}
  if [ "$dry" = 1 ]; then printf '%s\n' "$name" "$@" "" >>"$out/dry_runs.txt"; return; fi
  timeout "$limit" "$py" -m orchestrator "$@" "hydra.run.dir=$out/$name" >"$out/$name.log" 2>&1
  local rc=$?
  mkdir -p "$out/$name"; echo "$rc" >"$out/$name/status"
  if [ "$rc" = 0 ]; then echo "gpu_check: $name ok"; else echo "gpu_check: $name FAILED ($rc), see $out/$name.log"; fi
}

for precision in bf16 fp16; do
  run "ddp-$precision" +recipe=ddp "${common[@]}" "precision=$precision"
  run "fsdp_zero3-$precision" +recipe=fsdp_zero3 "${common[@]}" "precision=$precision"
  run "deepspeed_zero3-$precision" +recipe=deepspeed_zero3 "${common[@]}" "precision=$precision"
done
run deepspeed_zero3_offload-bf16 +recipe=deepspeed_zero3_offload "${common[@]}" precision=bf16
# precision=fp8 (torchao float8 linears; compute capability >= 8.9) needs nn.Linear layers,
# so a Llama shape of about GPT-2's size, against its bf16 twin: loss and tokens/s side by side
llama=(model=llama_tiny model.d_model=1024 model.n_layer=8 model.n_head=16 model.n_kv_head=8
       model.d_ff=2816 model.vocab_size=32768 model.max_seq_len=1024 data=text
       data.seq_len=1024 train.micro_batch_size=8 train.steps=30 train.log_every=5
       cluster.device=cuda cluster.gpus_per_node=1 "cluster.gpu=$gpu" logging=none
       logging.progress=false train.save_model=false)
# compiled, as torchao's float8 speed needs (eager fp8 is its slowest); MFU is against the
# bf16 peak (attention and the head stay bf16)
for precision in bf16 fp8; do
  run "llama-fsdp_zero3-$precision" +recipe=fsdp_zero3 "${llama[@]}" "precision=$precision" \
    train.compile=true
done
run llama-fsdp_zero3-fp8-all_gather +recipe=fsdp_zero3 "${llama[@]}" precision=fp8 \
  precision.fp8_all_gather=true train.compile=true
run llama-ddp-fp8 +recipe=ddp "${llama[@]}" precision=fp8 train.compile=true
# tensor parallelism over NCCL (the same Llama shape, TP=2, sequence parallel): DTensor's
# collectives on CUDA; and pipeline parallelism, alone and with FSDP2 beside it. They need 2 and
# 4 GPUs (NCCL refuses two ranks on one device); with fewer the rows are skipped and said so
# under the table
shape=(model.d_model=1024 model.n_layer=8 model.n_head=16 model.vocab_size=32768
       model.max_seq_len=1024 data=text data.seq_len=1024 train.steps=30 train.log_every=5
       cluster.device=cuda "cluster.gpu=$gpu" logging=none logging.progress=false
       train.save_model=false)
tp=(model=llama_tiny model.n_kv_head=8 model.d_ff=2816 "${shape[@]}")
ngpu=$([ "$dry" = 1 ] && echo 4 || "$py" -c "import torch; print(torch.cuda.device_count())")
tp_skipped=""
if [ "$ngpu" -ge 2 ]; then
  run llama-tp2-bf16 "${tp[@]}" cluster.gpus_per_node=2 parallelism.tensor_parallel=2 \
    precision=bf16 train.micro_batch_size=8
  # GPT-2 over NCCL: Conv1D slices (addmm on DTensors), c_attn's regrouped q/k/v columns
  run gpt2-tp2-bf16 model=gpt2_tiny "${shape[@]}" cluster.gpus_per_node=2 \
    parallelism.tensor_parallel=2 precision=bf16 train.micro_batch_size=8
  # pipeline parallelism over NCCL: 2 stages of 4 blocks, 1F1B, point-to-point sends
  run llama-pp2-bf16 "${tp[@]}" cluster.gpus_per_node=2 parallelism.pipeline_parallel=2 \
    precision=bf16 train.micro_batch_size=16 parallelism.pipeline_microbatches=4
  # context parallelism: each 1024-token sequence over 2 GPUs, ring attention on flash
  # (its losses against FSDP2's: tests/gpu/test_context_parallel.py, in the gpu tests below)
  run llama-cp2-bf16 "${tp[@]}" cluster.gpus_per_node=2 parallelism.context_parallel=2 \
    parallelism.zero_stage=3 precision=bf16 train.micro_batch_size=8
else
  tp_skipped="llama-tp2-bf16, gpt2-tp2-bf16, llama-pp2-bf16, llama-cp2-bf16 skipped: they need 2 GPUs, this machine has $ngpu"
fi
if [ "$ngpu" -ge 4 ]; then
  # 2 stages x 2 FSDP2 ranks each: the schedule's deferred reshard and reduce-scatter on NCCL
  run llama-pp2-fsdp2-bf16 "${tp[@]}" cluster.gpus_per_node=4 parallelism.pipeline_parallel=2 \
    parallelism.zero_stage=2 precision=bf16 train.micro_batch_size=8 \
    parallelism.pipeline_microbatches=4
  # 2 stages x TP 2: sequence slices sent stage to stage, the loss under loss_parallel
  run llama-pp2-tp2-bf16 "${tp[@]}" cluster.gpus_per_node=4 parallelism.pipeline_parallel=2 \
    parallelism.tensor_parallel=2 precision=bf16 train.micro_batch_size=16 \
    parallelism.pipeline_microbatches=4
else
  tp_skipped="${tp_skipped:+$tp_skipped; }llama-pp2-fsdp2-bf16, llama-pp2-tp2-bf16 skipped: they need 4 GPUs, this machine has $ngpu"
fi
[ -z "$tp_skipped" ] || echo "gpu_check: $tp_skipped"
# checkpoint + restart over NCCL: DCP shards of a CUDA model, a SIGKILLed rank, torchrun's
# restart with its own store prefix, resume from step 10 (losses 11-30 as uninterrupted)
run resume-fsdp_zero3-bf16 +recipe=fsdp_zero3 "${common[@]}" precision=bf16 \
  checkpoint.every_steps=10 fault.max_restarts=1 debug.crash_at_step=15 debug.crash_mode=sigkill
# async checkpoints: pinned host copies, DCP writes on a gloo group beside NCCL, commits
run async-checkpoint-fsdp_zero3-bf16 +recipe=fsdp_zero3 "${common[@]}" precision=bf16 \
  checkpoint.every_steps=5 checkpoint.async_save=true
# train.profile on CUDA: kernels in the Chrome trace, and the caching allocator's snapshot
# (profile/rank0.memory.pickle, for pytorch.org/memory_viz): a run without it fails
run profile-fsdp_zero3-bf16 +recipe=fsdp_zero3 "${common[@]}" precision=bf16 \
  "train.profile.steps=[5,6]" train.profile.memory=true
if [ "$dry" = 0 ] && [ ! -s "$out/profile-fsdp_zero3-bf16/profile/rank0.memory.pickle" ]; then
  echo "gpu_check: profile-fsdp_zero3-bf16 wrote no CUDA memory snapshot"
  echo 1 >"$out/profile-fsdp_zero3-bf16/status"
fi
# torch.compile per block on CUDA (inductor/triton), FSDP2; compile_s in the compile event
run compile-fsdp_zero3-bf16 +recipe=fsdp_zero3 "${common[@]}" precision=bf16 train.compile=true
# memmap data read by DataLoader workers into pinned batches, val/loss every 10 steps on CUDA
run workers-ddp-bf16 +recipe=ddp "${common[@]}" precision=bf16 data.num_workers=2 \
  eval.holdout=0.05 eval.every_steps=10
# a saved model for evaluate / generate (ZeRO-3 gather to rank 0 on a GPU)
run save-fsdp_zero3-bf16 +recipe=fsdp_zero3 "${common[@]}" precision=bf16 train.steps=10 \
  train.save_model=true
model="$out/save-fsdp_zero3-bf16/model"
[ "$dry" = 1 ] && model="$out/dry-model"
run evaluate-fsdp_zero3 +recipe=evaluate "model.pretrained_path=$model" model=gpt2 \
  data.seq_len=1024 cluster.device=cuda cluster.gpus_per_node=1 "cluster.gpu=$gpu" precision=bf16
run generate-fsdp_zero3 +recipe=generate "model.pretrained_path=$model" model=gpt2 \
  cluster.device=cuda cluster.gpus_per_node=1 "cluster.gpu=$gpu" precision=bf16 \
  "generate.prompts=[The ,def ]" generate.max_new_tokens=32
# int8 PTQ of that model on the GPU (torchao int8 weights, one process, fp32 activations)
run quantize-int8-fp32 +recipe=quantize "model.pretrained_path=$model" model=gpt2 \
  data.seq_len=1024 cluster.device=cuda "cluster.gpu=$gpu" precision=fp32

plan_all() {  # dry mode: each recorded run's overrides + action=plan, through cli.execute
  "$py" - "$out" <<'PY'
import contextlib, sys
from pathlib import Path
from hydra import compose, initialize_config_module
from orchestrator.cli import compose_job, execute
from orchestrator.common.errors import OrchestratorError

out = Path(sys.argv[1])
with initialize_config_module("configs", version_base="1.3"):
    for block in filter(None, (out / "dry_runs.txt").read_text().split("\n\n")):
        name, *overrides = block.strip("\n").split("\n")
        (out / name).mkdir(parents=True, exist_ok=True)
        with open(out / f"{name}.log", "w") as log, contextlib.redirect_stdout(log):
            try:
                cfg = compose("config", overrides=[*overrides, "action=plan"])
                rc = execute(compose_job(cfg, str(out / name)), overrides=overrides)
            except OrchestratorError as e:
                print(f"error: {e}", file=log)
                rc = 2
        (out / name / "status").write_text(f"{rc}\n")
        print(f"gpu_check: {name} {'ok' if rc == 0 else 'FAILED, see ' + str(log.name)}")
PY
}
[ "$dry" = 1 ] && plan_all
"$py" scripts/gpu_table.py "$out" | tee "$out/table.md"
table=${PIPESTATUS[0]}  # 1: a DeepSpeed ZeRO-3 run above its planned peak
[ -z "$tp_skipped" ] || echo "$tp_skipped" | tee -a "$out/table.md"
failed=$(grep -Lx 0 "$out"/*/status | wc -l)
[ "$dry" = 0 ] && [ "$table" != 0 ] && failed=$((failed + 1))
if [ "$dry" = 0 ]; then
  echo "gpu_check: gpu tests (every test marked gpu, wherever it lives)"
  timeout 600 "$py" -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$out/pytest.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || failed=$((failed + 1))
  echo "gpu_check: table in $out/table.md (copy it to docs/benchmarks.md)"
fi
[ "$failed" = 0 ] || { echo "gpu_check: $failed failed (runs or the gpu tests)" >&2; exit 1; }
