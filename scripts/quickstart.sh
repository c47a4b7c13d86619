#!/usr/bin/env bash
# The main job: a real 2-rank CPU training run (ZeRO-3 on FSDP2, gloo), logged to W&B offline.
# Extra arguments are Hydra overrides, e.g. `bash scripts/quickstart.sh +recipe=ddp train.steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export WANDB_MODE="${WANDB_MODE:-offline}"
exec .venv/bin/python -m orchestrator +recipe=fsdp_zero3 "$@"
