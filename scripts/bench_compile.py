"""`train.compile=true` against eager (issue 14: compiled >= 1.0x eager tokens/s on CPU for
`gpt2_small_cpu` after warm-up).

    python scripts/bench_compile.py [--recipe ddp] [--rounds 3] [--steps 20] [--out FILE]

Each round launches `python -m orchestrator +recipe=<recipe> model=gpt2_small_cpu` (2 gloo ranks)
eager and with `train.compile=true`, in alternating order. Tokens/s is the median over steps
4..N of metrics.jsonl (compilation happens in a warm-up before step 1 and is logged as the
`compile` event's `compile_s`, outside every step). Reported: medians per side, the paired
per-round ratios compiled ÷ eager and their median, and the compile time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import MODEL, SKIP, bench_env, launch  # noqa: E402


def run(recipe: str, steps: int, compiled: bool, run_dir: Path,
        env: dict[str, str]) -> dict[str, float]:
    command = [sys.executable, "-m", "orchestrator", f"+recipe={recipe}", f"model={MODEL}",
               f"train.steps={steps}", "logging=none", "logging.progress=false",
               "train.save_model=false", "train.log_every=1", f"hydra.run.dir={run_dir}",
               f"train.compile={str(compiled).lower()}"]
    wall, code, tail = launch(command, env)
    if code != 0:
        raise SystemExit(f"exit {code}: {' '.join(command)}\n{tail}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_tps = [r["tokens_per_s"] for r in records if r.get("step", 0) > SKIP]
    compile_s = next((r["compile_s"] for r in records if r.get("event") == "compile"), 0.0)
    last = [r["loss"] for r in records if "loss" in r][-1]
    return {"tokens_per_s": statistics.median(steps_tps), "compile_s": compile_s,
            "wall_s": wall, "last_loss": last}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="ddp")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("bench_compile.json"))
    args = p.parse_args()
    env = bench_env()
    rows: list[dict[str, float | int | str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for compiled in (True, False) if rnd % 2 == 0 else (False, True):
                got = run(args.recipe, args.steps, compiled, Path(tmp) / f"{rnd}-{compiled}", env)
                rows.append({"round": rnd, "side": "compiled" if compiled else "eager", **got})
                print(f"round {rnd + 1} {'compiled' if compiled else 'eager'}: "
                      f"{got['tokens_per_s']:,.0f} tokens/s, compile {got['compile_s']:.1f} s, "
                      f"wall {got['wall_s']:.1f} s, last loss {got['last_loss']:.4f}", flush=True)

    def side(name: str) -> list[dict[str, float | int | str]]:
        return sorted((r for r in rows if r["side"] == name), key=lambda r: r["round"])

    paired = [float(c["tokens_per_s"]) / float(e["tokens_per_s"])
              for c, e in zip(side("compiled"), side("eager"), strict=True)]
    result = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv,
              "recipe": args.recipe, "model": MODEL, "runs": rows, "ratio_per_round": paired,
              "ratio_median": statistics.median(paired),
              "compile_s_median": statistics.median(float(r["compile_s"])
                                                    for r in side("compiled"))}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\ncompiled ÷ eager tokens/s ({args.recipe}, {MODEL}, steps {SKIP + 1}-{args.steps}): "
          f"median {result['ratio_median']:.3f} (rounds {', '.join(f'{x:.3f}' for x in paired)}); "
          f"compile {result['compile_s_median']:.1f} s; JSON: {args.out}")


if __name__ == "__main__":
    main()
