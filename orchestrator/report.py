"""Human-readable views of a Plan (rich tables)."""

from __future__ import annotations

import shlex

from rich.console import Console
from rich.table import Table

from orchestrator.plan import Plan


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def print_plan(plan: Plan, console: Console | None = None) -> None:
    console = console or Console(stderr=False)
    t = Table(title=f"plan: {plan.strategy} (ZeRO-{plan.zero_stage}), {plan.precision}",
              show_header=False)
    c, m = plan.compute, plan.memory
    rows = [
        ("ranks", f"{plan.world_size} = {plan.nnodes} node(s) x {plan.nproc_per_node} "
                  f"({plan.device}, {plan.backend})"),
        ("batch", f"global {plan.global_batch_size} = micro {plan.micro_batch_size} x accum "
                  f"{plan.grad_accum_steps} x dp {plan.world_size}"),
        ("parameters", f"{c.params:,}"),
        ("tokens", f"{c.tokens:,} ({c.tokens_vs_chinchilla:.2g} x Chinchilla's "
                   f"{c.chinchilla_tokens:,})"),
        ("train FLOPs (6ND)", f"{c.flops:.3g}"),
    ]
    for name, mb in m.moments.items():
        rows.append((f"rank {m.rank} model state {name}",
                     f"{human_bytes(mb.total_bytes)} = params {human_bytes(mb.params_bytes)} + "
                     f"grads {human_bytes(mb.grads_bytes)} + optimizer "
                     f"{human_bytes(mb.optimizer_bytes)}"))
    rows.append(("peak model state", f"{human_bytes(m.peak_bytes)} ({m.peak_moment})"))
    for i, cmd in enumerate(plan.commands):
        rows.append((f"node {i} command", shlex.join(cmd)))
    if m.host_bytes:
        rows.append(("offloaded to CPU memory", human_bytes(m.host_bytes)))
    for key, value in rows:
        t.add_row(key, value)
    console.print(t)
    if plan.deepspeed_config is not None:
        console.print("DeepSpeed config (deepspeed.json):")
        console.print_json(data=plan.deepspeed_config)
