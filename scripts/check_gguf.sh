#!/usr/bin/env bash
# llama.cpp itself runs our GGUF export: builds llama-cpp-python (its own copy of llama.cpp,
# compiled here: minutes, too slow for CI) into a virtual environment of its own, trains
# gpt2_tiny and llama_tiny briefly with a BPE on the built-in corpus, exports each as GGUF and
# compares llama.cpp's greedy tokens with transformers' (scripts/check_gguf.py).
#   bash scripts/check_gguf.sh            (the result is recorded in docs/export.md)
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_VENV="${LLAMA_VENV:-${TMPDIR:-/tmp}/orchestrator-llamacpp}"
[ -x .venv/bin/python ] || { echo "check_gguf.sh: run the README's test command first (.venv)" >&2; exit 1; }
if ! "$LLAMA_VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  python3 -m venv "$LLAMA_VENV"
  "$LLAMA_VENV/bin/pip" install -q "llama-cpp-python==0.3.36"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for model in gpt2_tiny llama_tiny; do
  .venv/bin/python -m orchestrator "model=$model" data=text data.tokenizer=bpe train.steps=400 \
    checkpoint.every_steps=400 cluster.gpus_per_node=1 logging=none train.save_model=false \
    logging.progress=false "hydra.run.dir=$work/$model" > "$work/$model.log"
done
.venv/bin/python scripts/check_gguf.py --llama-python "$LLAMA_VENV/bin/python" \
  "$work/gpt2_tiny" "$work/llama_tiny"
