"""Greedy generation from an exported GGUF file in llama.cpp (llama-cpp-python) against
transformers' greedy generation from the same checkpoint's Hugging Face export.

    python scripts/check_gguf.py --llama-python PY RUN_DIR [RUN_DIR ...]

Run by scripts/check_gguf.sh, which builds llama-cpp-python into its own virtual environment
(PY) and trains the runs. For each run: its newest checkpoint is exported as a Hugging Face
model and as GGUF (f32, f16, q8_0); the prompt is tokenized by the run's tokenizer and by
llama.cpp from the GGUF's own tokenizer (they must agree), then both generate greedily.
Prints one JSON line per (run, type): the token agreement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The history of the city begins"
NEW_TOKENS = 24
LLAMA_SIDE = r"""
import json, sys
from llama_cpp import Llama
path, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=128, n_threads=2, verbose=False, logits_all=True)
ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
llm.eval(ids)
logits = llm.scores[:len(ids)].tolist()  # every prompt position's next-token logits
llm.reset()
out = []
for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
    out.append(token)
    if len(out) == n:
        break
print(json.dumps({"prompt_ids": ids, "generated": out, "logits": logits}))
"""


def export(run_dir: Path, *extra: str) -> Path:
    sys.path.insert(0, str(REPO))
    from orchestrator.run.checkpoint.export import export as run_export
    from tests.conftest import make_job

    return run_export(make_job(["action=export", f"run_dir={run_dir}", "run.overwrite=true",
                                *extra]))


def transformers_greedy(model_dir: Path, run_dir: Path
                        ) -> tuple[list[int], list[int], list[list[float]]]:
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    ids = Tokenizer.from_file(str(run_dir / "tokenizer.json")).encode(PROMPT).ids
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = list(ids)
    with torch.no_grad():  # greedy by hand: no generate() rule (eos, min length) in the way
        logits = model(torch.tensor([ids])).logits[0].tolist()
        for _ in range(NEW_TOKENS):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return ids, out[len(ids):], logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-python", required=True)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    failed = False
    for run_dir in args.runs:
        prompt_ids, want, want_logits = transformers_greedy(export(run_dir), run_dir)
        for dtype, quant in (("f32", "none"), ("f16", "none"), ("f16", "q8_0")):
            path = export(run_dir, "format=gguf", f"dtype={dtype}", f"quant={quant}")
            got = json.loads(subprocess.run(
                [args.llama_python, "-c", LLAMA_SIDE, str(path), PROMPT, str(NEW_TOKENS)],
                capture_output=True, text=True, check=True).stdout)
            first = next((i for i, (a, b) in enumerate(zip(got["generated"], want, strict=False))
                          if a != b), None)
            same = NEW_TOKENS if first is None else first  # equal up to the first difference
            import numpy as np

            diff = float(np.abs(np.array(got["logits"]) - np.array(want_logits)).max())
            row = {"run": run_dir.name, "file": path.name,
                   "tokenizer_agrees": got["prompt_ids"] == prompt_ids,
                   "prompt_logits_max_abs_diff": diff,
                   "max_abs_logit": float(np.abs(np.array(want_logits)).max()),
                   "tokens_equal": f"{same}/{NEW_TOKENS}", "llama_cpp": got["generated"][:8],
                   "transformers": want[:8], "first_difference": first}
            print(json.dumps(row), flush=True)
            failed |= not row["tokenizer_agrees"] or (dtype == "f32" and same != NEW_TOKENS)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
