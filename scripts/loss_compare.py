"""Run recipes at the same seed and compare their per-step losses (torchtitan-style).

    python scripts/loss_compare.py                      # compare all strategies with DDP
    python scripts/loss_compare.py --write              # refresh tests/assets/losses/
    python scripts/loss_compare.py ddp fsdp_zero3 -o precision=bf16

Prints the largest absolute per-step difference of each recipe from the first one and from the
stored reference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from orchestrator.common.records import read_metrics  # noqa: E402

REFERENCE = REPO / "tests" / "assets" / "losses" / "gpt2_tiny_fp32_seed1234.json"
# The settings the reference losses were recorded with (tests use the same).
BASE = ["train.steps=20", "logging=none", "logging.progress=false"]


def run_losses(recipe: str, extra: list[str], out: Path) -> list[float]:
    cmd = [sys.executable, "-m", "orchestrator", f"+recipe={recipe}", *BASE, *extra,
           f"hydra.run.dir={out / recipe}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{recipe} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return [m["loss"] for m in read_metrics(out / recipe / "metrics.jsonl")]


def max_abs_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipes", nargs="*", default=["ddp", "zero1", "fsdp_zero2", "fsdp_zero3"])
    p.add_argument("--write", action="store_true", help="store the first recipe's losses")
    p.add_argument("-o", "--override", action="append", default=[], help="Hydra override")
    args = p.parse_args()
    extra = args.override
    with tempfile.TemporaryDirectory() as tmp:
        losses = {r: run_losses(r, extra, Path(tmp)) for r in args.recipes}
    first = args.recipes[0]
    ref = json.loads(REFERENCE.read_text())["losses"] if REFERENCE.exists() else None
    for r, values in losses.items():
        vs_ref = f"{max_abs_diff(values, ref):.3g}" if ref else "n/a"
        print(f"{r:12s} first={values[0]:.6f} last={values[-1]:.6f} "
              f"max|Δ| vs {first}={max_abs_diff(values, losses[first]):.3g} vs reference={vs_ref}")
    if args.write:
        REFERENCE.parent.mkdir(parents=True, exist_ok=True)
        REFERENCE.write_text(json.dumps(
            {"recipe": first, "overrides": BASE + extra, "losses": losses[first]}, indent=2) + "\n")
        print(f"wrote {REFERENCE}")


if __name__ == "__main__":
    main()
