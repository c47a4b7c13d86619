"""Generate text from a trained causal LM (one process): `python -m orchestrator +recipe=generate
model.pretrained_path=<run_dir>/model generate.prompts='[...]'`.

Writes `<run_dir>/generations.jsonl` (prompt, completion, settings) and prints each completion.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from orchestrator.data import get_tokenizer
from orchestrator.models import build_model
from orchestrator.sampling import generate
from orchestrator.typed import load_job


def main(argv: list[str]) -> int:
    job = load_job(argv[1])
    g_cfg = job.generate
    device = os.environ.get("ORCHESTRATOR_DEVICE", "cpu")
    model = build_model(job.model, seed=job.train.seed, device=device)
    tok = get_tokenizer(job)
    g = torch.Generator().manual_seed(job.train.seed)
    out = Path(job.run_dir) / "generations.jsonl"
    with open(out, "w") as f:
        for prompt in g_cfg.prompts:
            ids = generate(model, tok.encode(prompt), g_cfg.max_new_tokens, g_cfg.temperature,
                           g_cfg.top_k, g_cfg.top_p, g, eos_id=tok.eos_id,
                           max_len=model.config.max_position_embeddings)
            text = tok.decode(ids)
            f.write(json.dumps({"prompt": prompt, "completion": text, "token_ids": ids,
                                "temperature": g_cfg.temperature, "top_k": g_cfg.top_k,
                                "top_p": g_cfg.top_p, "seed": job.train.seed}) + "\n")
            print(f"{prompt!r} -> {text!r}", flush=True)
    print(f"generations: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
