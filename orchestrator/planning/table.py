"""Human-readable views of a Plan (rich tables); secrets are redacted (common/secrets.py)."""

from __future__ import annotations

import shlex
from typing import Any

from rich.console import Console
from rich.table import Table

from orchestrator.common.plan import Plan
from orchestrator.common.secrets import redact
from orchestrator.common.units import human_bytes


def _fmt(value: float | None, fmt: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{unit}"


def _mesh_rows(plan: Plan) -> list[tuple[str, str]]:
    """The pipeline's shape and bubble, and the bytes sent per step on each mesh dimension."""
    rows = []
    if plan.pipeline:
        pp = plan.pipeline
        rows.append(("pipeline", f"{pp['stages']} stages, {pp['schedule']}, "
                     f"{pp['microbatches']} micro-batches of {pp['microbatch_size']}: bubble "
                     f"{pp['bubble_fraction']:.0%} of each step"))
    sent = {dim: n for dim, n in plan.comm_bytes.items() if n}
    if sent:
        rows.append(("sent per step (per rank)", " + ".join(
            f"{dim} {human_bytes(n)}" for dim, n in sent.items())))
    if plan.step_estimate:
        rows.append(("step time (estimate)", step_text(plan.step_estimate)))
    return rows


def step_text(est: dict[str, float]) -> str:
    """"4.7 s = compute 4.6 + dp 0.1 not hidden (dp 4.7 s overlapped) + tp 0.02 ..."."""
    parts = [f"compute {est['compute_s']:.3g}"]
    if est["bubble_s"]:
        parts.append(f"bubble {est['bubble_s']:.3g}")
    if est.get("dp_s"):
        parts.append(f"dp {est['dp_exposed_s']:.3g} not hidden by compute (of "
                     f"{est['dp_s']:.3g})")
    parts += [f"{dim} {est[f'{dim}_s']:.3g}" for dim in ("tp", "cp", "pp") if est.get(f"{dim}_s")]
    return f"{est['total_s']:.3g} s = " + " + ".join(parts)


def plan_rows(plan: Plan) -> list[tuple[str, str]]:
    c, m = plan.compute, plan.memory
    frozen = c.trainable_params is not None and c.trainable_params != c.params
    rows = [
        ("ranks", f"{plan.world_size} = {plan.nnodes} node(s) x {plan.nproc_per_node} "
                  f"({plan.device}, {plan.backend}"
                  + (f", {plan.gpu}" if plan.gpu else "") + ")"),
        *([("mesh", plan.mesh)] if plan.mesh else []),
        ("batch", f"global {plan.global_batch_size} = micro {plan.micro_batch_size} x accum "
                  f"{plan.grad_accum_steps} x dp "
                  f"{plan.global_batch_size // (plan.micro_batch_size * plan.grad_accum_steps)}"),
        ("parameters", f"{c.params:,}" + (f" ({c.trainable_params:,} trainable, LoRA)"
                                          if frozen else "")
         + (" + a frozen DPO reference copy" if c.reference else "")),
        ("tokens", f"{c.tokens:,}: {c.chinchilla_verdict} ({c.chinchilla_tokens:,})"),
        ("train FLOPs", f"{c.flops:.3g} ({c.flops_per_token:.3g} per token: "
                        + ("4N + 2N_trainable" if frozen else "6N") + " + attention"
                        + (", x2 answers + reference forward 2N" if c.reference else "") + ")"),
    ]
    if c.budget_flops:
        rows.append(("compute-optimal for budget", f"{c.budget_flops:.3g} FLOPs -> N* = "
                     f"{c.optimal_params:,} params, D* = {c.optimal_tokens:,} tokens"))
    rows += _mesh_rows(plan)
    for name, mb in m.moments.items():
        rows.append((f"rank {m.rank} model state {name}",
                     f"{human_bytes(mb.total_bytes)} = params {human_bytes(mb.params_bytes)} + "
                     f"grads {human_bytes(mb.grads_bytes)} + optimizer "
                     f"{human_bytes(mb.optimizer_bytes)}"))
    rows += [
        ("ZeRO paper model state", human_bytes(m.zero_paper_bytes)),
        ("activations (1 micro batch)", human_bytes(m.activations_bytes)),
        ("working set (gathered units + unsharded grads)", human_bytes(m.working_set_bytes)),
        ("buffers/fragmentation", human_bytes(m.overhead_bytes)),
        ("peak per rank", human_bytes(m.peak_total_bytes)
         + (f" of {human_bytes(plan.device_memory_bytes)}: "
            + ("fits" if plan.fits else "DOES NOT FIT") if plan.device_memory_bytes else "")),
    ]
    if m.host_bytes:
        rows.append(("offloaded to CPU memory", human_bytes(m.host_bytes)))
    if c.step_time_s is not None:
        rows += [
            ("time", f"{_fmt(c.step_time_s, '.3g', ' s')}/step, "
                     f"{_fmt(c.wall_time_s / 3600, '.3g', ' h')} wall at MFU {c.mfu:.0%}"),
            ("GPU-hours / cost", f"{c.gpu_hours:,.1f} GPU-h"
             + (f", ${c.cost_usd:,.0f}" if c.cost_usd is not None else "")),
        ]
    if plan.quantize:
        rows += quantize_rows(plan.quantize)
    if plan.auto_reason:
        rows.append(("parallelism=auto", plan.auto_reason))
    rows.append(("node 0 command", shlex.join(plan.commands[0])))
    if len(plan.commands) > 1:
        rows.append((f"nodes 1..{len(plan.commands) - 1}", "the same with --node-rank=N"))
    return rows


def quantize_rows(q: dict[str, Any]) -> list[tuple[str, str]]:
    """The plan's int8 PTQ rows: linear-weight and whole-model bytes, fp32 -> int8."""
    return [
        (f"{q['method']}: linear weights", f"{human_bytes(q['linear_fp32_bytes'])} fp32 -> "
         f"{human_bytes(q['linear_int8_bytes'])} int8 ({q['linear_ratio']:.2f}x smaller; "
         f"{q['linear_layers']} layers, an fp32 scale + int8 zero point per output row)"),
        (f"{q['method']}: model weights", f"{human_bytes(q['weight_fp32_bytes'])} -> "
         f"{human_bytes(q['weight_int8_bytes'])} (embeddings, norms and biases stay fp32)"),
    ]


def print_plan(plan: Plan, console: Console | None = None) -> None:
    console = console or Console()
    t = Table(title=f"plan: {plan.strategy} (ZeRO-{plan.zero_stage}), {plan.precision}",
              show_header=False)
    for key, value in plan_rows(plan):
        t.add_row(key, value)
    console.print(t)
    if plan.deepspeed_config is not None:
        console.print("DeepSpeed config (deepspeed.json):")
        console.print_json(data=redact(plan.deepspeed_config))
