#!/usr/bin/env bash
# The test suite: lint, then every test except `gpu` ones: real gloo process groups, real
# DeepSpeed engines, real W&B offline runs, and a real Slurm cluster on this machine
# (started here with scripts/start_slurm.sh and stopped afterwards). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/lint-imports  # the layers (docs/architecture.md): no import points upward
trap 'bash scripts/stop_slurm.sh' EXIT
# a cluster that does not come up stops the run here, with start_slurm's reason
bash scripts/start_slurm.sh >/dev/null || { echo "test.sh: the Slurm test cluster did not start" >&2; exit 1; }
export SLURM_CONF="${ORCHESTRATOR_SLURM_DIR:-/tmp/orchestrator-slurm}/slurm.conf"
# Two pytest workers, one test file each at a time (module fixtures run once): a 2-rank run
# keeps both cores busy only while its ranks run; its launcher's start-up and tear-down leave one
# idle, which the other worker fills. Files go out longest first (tests/conftest.py), in the
# order collected; skipped tests are listed (-ra), and in CI (CI=true, .ci/run) fail.
.venv/bin/python -m pytest -m "not gpu" -n 2 --dist loadfile --no-loadscope-reorder \
  --durations=25 "$@"
