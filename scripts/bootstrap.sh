#!/usr/bin/env bash
# Create .venv and install the project with its dev tools, once per pyproject.toml change.
# CPU machines get torch==2.13.0 (a local CPU wheel; unpinned torch pulls a multi-GB CUDA build).
# A machine whose python3 already has torch (e.g. a GPU box) keeps that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${ORCHESTRATOR_VENV:-.venv}"
py="${PYTHON:-}"
if [ -z "$py" ]; then  # the first python3 >= 3.10 on PATH
  for c in python3 python3.13 python3.12 python3.11 python3.10; do
    if "$c" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
      py=$c; break
    fi
  done
  [ -n "$py" ] || { echo "bootstrap: needs Python >= 3.10 and pip; python3 is" \
                      "$(python3 --version 2>&1)" >&2; exit 2; }
fi
if [ ! -x "$venv/bin/python" ]; then
  if "$py" -c "import torch" >/dev/null 2>&1; then
    # a machine's own torch is kept: it must be one torchrun of which takes our flags
    if ! "$py" -c "import sys, torch; v = torch.__version__.split('+')[0].split('.')
sys.exit(0 if (int(v[0]), int(v[1])) >= (2, 9) else 1)"; then
      echo "bootstrap: $py has torch $("$py" -c 'import torch; print(torch.__version__)');" \
        "orchestrator needs torch >= 2.9 (torchrun's --signals-to-handle): upgrade it, or" \
        "set PYTHON= to a python3 without torch (then torch==2.13.0 is installed)" >&2
      exit 2
    fi
    "$py" -m venv --system-site-packages "$venv"   # keep the user's torch
  else
    "$py" -m venv "$venv"
  fi
fi
stamp="$venv/.installed"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
pip_install() {  # pip's own exit status; its output only when it failed (or warns otherwise)
  local out
  out="$("$venv/bin/python" -m pip install -q "$@" 2>&1)" || {
    echo "$out" >&2; echo "bootstrap: pip install $* failed" >&2; exit 1; }
  grep -v "^WARNING: Location" <<<"$out" >&2 || true  # nothing left to show is fine
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing into $venv (first run takes about a minute)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 \
    || echo "bootstrap: pip not upgraded; going on with $("$venv/bin/python" -m pip --version)" >&2
  if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    pip_install "torch==2.13.0"
  fi
  pip_install -e ".[dev]"
  # DeepSpeed builds against the installed torch: no build isolation, no ahead-of-time ops
  # (the one op it needs is JIT-built once into the project cache on first use).
  DS_BUILD_OPS=0 pip_install --no-build-isolation "deepspeed>=0.19,<0.20"
  "$venv/bin/python" -c "import torch, hydra, wandb, transformers, deepspeed, orchestrator" \
    || { echo "bootstrap: install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
