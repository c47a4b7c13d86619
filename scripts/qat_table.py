"""Print the PTQ-vs-QAT table of docs/precision.md by running the real thing (no hand numbers):
for each model and seed, pre-train it twice with `+recipe=causal_lm`, on the same data, steps
and seed: plain fp32, and with `precision.qat=int8` (which converts and saves the int8 model at
the end); then quantize the fp32 model after training (PTQ) with the same int8 scheme QAT
converts to (torchao `IntxWeightOnlyConfig(int8, PerAxis(0))`, `quantization.qat.ptq`) and with
PTQ's `int8_weight_only` (torchao `Int8WeightOnlyConfig`), and compare held-out perplexities,
all on the runs' own held-out share. Several seeds give the run-to-run noise the comparison
is judged against.

    python scripts/qat_table.py [--steps 300] [--seeds 1234 1 2] [--ranks 1]
        [--out runs/qat_table] [--set KEY=VALUE ...] [MODEL ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.common.units import human_bytes  # noqa: E402


def cli(args: list[str], run_dir: Path, ranks: int, done: str) -> None:
    """One launch; a run dir that holds `done` already is re-used as it is."""
    if (run_dir / done).exists():
        return
    place = (["cluster.gpus_per_node=1", "parallelism=ddp"] if ranks == 1
             else [f"cluster.gpus_per_node={ranks}"])
    cmd = [sys.executable, "-m", "orchestrator", *args, *place, "logging=none",
           "logging.progress=false", f"hydra.run.dir={run_dir}"]
    print("$ " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def ptq_perplexities(run_dir: Path) -> dict[str, float]:
    """Held-out perplexity of the fp32 run's saved model as it is, after `quantization.qat.ptq`
    (QAT's int8 scheme) and after `int8_weight_only` PTQ, on the run's own held-out share (one
    process; the same samples the QAT run's report measures on)."""
    import copy

    import torch.distributed as dist

    from orchestrator.config.load import load_job
    from orchestrator.data import train_and_held_out
    from orchestrator.models.build import build_model
    from orchestrator.quantization.ptq import quantize_model
    from orchestrator.quantization.qat import ptq
    from orchestrator.run.evaluation import eval_mode, held_out_sums, summarize
    from orchestrator.run.quantized import inference_engine

    job = load_job(str(run_dir / "config.yaml"))
    saved = dataclasses.replace(job.model, pretrained_path=str(run_dir / "model"))
    fp32 = build_model(saved, seed=0).eval()
    same, int8_weight_only = copy.deepcopy(fp32), copy.deepcopy(fp32)
    ptq(same)
    quantize_model(int8_weight_only, "int8_weight_only")
    _, held_out = train_and_held_out(job)
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    out = {}
    for name, model in (("fp32", fp32), ("same", same), ("int8_weight_only", int8_weight_only)):
        with eval_mode(model):
            total = held_out_sums(inference_engine(model, job, "cpu"), held_out, job, 0, 1)
        out[name] = summarize(total)["perplexity"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["gpt2_small_cpu", "llama_tiny"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234])
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], help="more overrides for every run")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "qat_table")
    a = parser.parse_args()
    rows, gaps = [], []
    for model in a.models:
        for seed in a.seeds:
            common = ["+recipe=causal_lm", f"model={model}", f"train.steps={a.steps}",
                      f"train.seed={seed}", *a.set]
            fp32, qat = (a.out / f"{model}-s{seed}-{k}" for k in ("fp32", "qat"))
            cli(common, fp32, a.ranks, "model")
            cli([*common, "precision.qat=int8"], qat, a.ranks, "quantize.json")
            r = json.loads((qat / "quantize.json").read_text())
            p = ptq_perplexities(fp32)
            gap = r["perplexity_after"] / p["same"] - 1
            gaps.append((model, gap, p["fp32"]))
            rows.append(
                f"| {model} | {seed} | {p['fp32']:.4f} | {p['same']:.4f} | "
                f"{p['int8_weight_only']:.4f} | {r['perplexity_before']:.4f} | "
                f"{r['perplexity_after']:.4f} | {gap:+.3%} | "
                f"{human_bytes(r['linear_weight_bytes_before'])} → "
                f"{human_bytes(r['linear_weight_bytes_after'])} "
                f"({r['linear_weight_ratio']:.2f}×) | {human_bytes(r['weight_bytes_after'])} |")
    import torch
    import torchao

    sets = "".join(f" --set {' '.join(a.set)}" if a.set else "")
    print(f"Generated {datetime.date.today()} by `python scripts/qat_table.py --steps {a.steps}"
          f" --seeds {' '.join(map(str, a.seeds))} --ranks {a.ranks}{sets} "
          f"{' '.join(a.models)}` (torch {torch.__version__}, torchao {torchao.__version__}, "
          f"{len(os.sched_getaffinity(0))} CPU cores); each model pre-trained {a.steps} steps "
          "with `+recipe=causal_lm`, fp32 and with `precision.qat=int8`, same data, steps and "
          "seed; perplexity on the 10 % held out.\n")
    print("| model | seed | fp32 | PTQ int8 (QAT's scheme) | PTQ `int8_weight_only` | "
          "QAT fake-quant | QAT int8 | QAT vs PTQ (same scheme) | linear weights fp32 → int8 "
          "| int8 model weights |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    for model in a.models:
        mine = [(g, f) for m, g, f in gaps if m == model]
        fp32s = [f for _, f in mine]
        spread = (max(fp32s) - min(fp32s)) / statistics.mean(fp32s) if len(mine) > 1 else 0.0
        print(f"\n{model}: QAT int8 vs PTQ int8 (same scheme), per seed: "
              f"{', '.join(f'{g:+.3%}' for g, _ in mine)}; fp32 perplexity spread over seeds "
              f"(max - min) / mean: {spread:.3%}")


if __name__ == "__main__":
    main()
