"""Print the int8 PTQ table of docs/precision.md by running the real thing (no hand numbers):
pre-train each model with `+recipe=causal_lm` on the built-in corpus (one process), quantize
its saved model with `+recipe=quantize` for every method, and read each run's quantize.json.

    python scripts/ptq_table.py [--steps 300] [--out runs/ptq_table] [MODEL ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.common.units import human_bytes  # noqa: E402

METHODS = ["int8_weight_only", "int8_dynamic"]
ONE = ["cluster.gpus_per_node=1", "parallelism=ddp", "logging=none", "logging.progress=false"]


def cli(args: list[str], run_dir: Path) -> None:
    """One launch; a run dir that holds a finished run is re-used as it is."""
    if (run_dir / "metrics.jsonl").exists() and ((run_dir / "model").exists()):
        return
    cmd = [sys.executable, "-m", "orchestrator", *args, *ONE, f"hydra.run.dir={run_dir}"]
    print("$ " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["gpt2_small_cpu", "llama_tiny"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ptq_table")
    a = parser.parse_args()
    rows = []
    for model in a.models:
        trained = a.out / f"{model}-train"
        cli(["+recipe=causal_lm", f"model={model}", f"train.steps={a.steps}"], trained)
        for method in METHODS:
            run = a.out / f"{model}-{method}"
            cli(["+recipe=quantize", f"model.pretrained_path={trained / 'model'}",
                 f"quantize.method={method}"], run)
            r = json.loads((run / "quantize.json").read_text())
            change = r["perplexity_after"] / r["perplexity_before"] - 1
            size = {k: human_bytes(v) for k, v in r.items() if k.endswith(("_before", "_after"))
                    and "bytes" in k}
            rows.append(
                f"| {model} | {method} | {r['linear_layers']} | "
                f"{size['linear_weight_bytes_before']} → {size['linear_weight_bytes_after']}"
                f" ({r['linear_weight_ratio']:.2f}×) | {size['weight_bytes_before']} → "
                f"{size['weight_bytes_after']} | {r['perplexity_before']:.4f} → "
                f"{r['perplexity_after']:.4f} ({change:+.4%}) | {r['tokens']:,} |")
    import torch
    import torchao

    print(f"Generated {datetime.date.today()} by `python scripts/ptq_table.py --steps {a.steps}"
          f" {' '.join(a.models)}` (torch {torch.__version__}, torchao {torchao.__version__}, "
          f"{len(os.sched_getaffinity(0))} CPU cores); each model pre-trained "
          f"{a.steps} steps with `+recipe=causal_lm` (byte tokens, built-in corpus), perplexity "
          "on the 10 % it held out.\n")
    print("| model | method | linear layers | linear weights fp32 → int8 | model weights "
          "| held-out perplexity fp32 → int8 | tokens |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    planned_table(["gpt2", "gpt2_xl", "llama2_7b", "llama3_8b"])


def planned_table(models: list[str]) -> None:
    """What the plan shows for models too big to quantize here: sizes from parameter shapes."""
    from orchestrator.models.spec_cache import cached_specs
    from orchestrator.quantization.int8 import quantized_size
    from tests.conftest import make_job

    print("\n| model (planned, `action=plan`) | linear layers | linear weights fp32 → int8 "
          "| model weights fp32 → int8 |")
    print("|---|---|---|---|")
    for name in models:
        q = quantized_size(cached_specs(make_job([f"model={name}"]).model), "int8_weight_only")
        print(f"| {name} | {q.linear_layers} | {human_bytes(q.linear_fp32_bytes)} → "
              f"{human_bytes(q.linear_int8_bytes)} ({q.linear_ratio:.2f}×) | "
              f"{human_bytes(q.weight_fp32_bytes)} → {human_bytes(q.weight_int8_bytes)} |")


if __name__ == "__main__":
    main()
