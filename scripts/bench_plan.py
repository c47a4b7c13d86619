"""Time `make_plan` for every shipped model x strategy x precision x cluster shape (on CPU,
without allocating any model). Prints the slowest plan and the total.

    python scripts/bench_plan.py
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.planning.plan import make_plan  # noqa: E402
from tests.conftest import REPO, make_job  # noqa: E402

MODELS = sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml"))
STRATEGIES = [["parallelism=ddp"], ["parallelism=zero1"], ["parallelism=zero2"],
              ["parallelism=zero3"], ["parallelism=zero3", "parallelism.backend=deepspeed"]]
PRECISIONS = ["fp32", "bf16", "fp16", "bf16_pure"]
SHAPES = [(1, 1, "l4"), (1, 8, "a100_80gb"), (8, 8, "h100"), (64, 8, "h200")]


def main() -> None:
    t = time.perf_counter()
    import transformers

    for cls in ("GPT2LMHeadModel", "LlamaForCausalLM", "BertForMaskedLM",
                "T5ForConditionalGeneration"):
        getattr(transformers, cls)  # transformers imports model code lazily
    imports = time.perf_counter() - t
    timings = []
    start_all = time.perf_counter()
    for model, strat, prec, (nodes, gpus, gpu) in itertools.product(MODELS, STRATEGIES,
                                                                    PRECISIONS, SHAPES):
        if prec == "bf16_pure" and "parallelism.backend=deepspeed" in strat:
            continue
        overrides = [f"model={model}", *strat, f"precision={prec}", f"cluster.nodes={nodes}",
                     f"cluster.gpus_per_node={gpus}", f"cluster.gpu={gpu}", "action=plan"]
        job = make_job(overrides)  # Hydra compose is not part of the planner's time
        t = time.perf_counter()
        make_plan(job, "cuda", 2)
        timings.append((time.perf_counter() - t, " ".join(overrides)))
    total = time.perf_counter() - start_all
    worst = max(timings)
    print(f"one-off transformers imports: {imports:.2f} s")
    print(f"{len(timings)} plans; slowest {worst[0]:.3f} s ({worst[1]}); "
          f"median {sorted(timings)[len(timings) // 2][0] * 1e3:.1f} ms; "
          f"total incl. Hydra compose {total:.1f} s")


if __name__ == "__main__":
    main()
