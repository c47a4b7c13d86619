#!/usr/bin/env bash
# The test suite: lint, then every test except `gpu` ones (real gloo process groups, real W&B
# offline runs). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -m "not gpu" "$@"
