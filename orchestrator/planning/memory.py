"""Per-rank model-state memory: parameters, gradients and optimizer state, per strategy.

ZeRO stage semantics (the ZeRO paper's order): stage 1 shards the optimizer state, stage 2 also
the gradients, stage 3 also the parameters. With mixed-precision Adam the paper's baseline is
2Ψ + 2Ψ + 12Ψ bytes; our fp32/autocast recipes keep fp32 master weights, so the baseline here is
4Ψ (params) + 4Ψ (grads) + 8Ψ (Adam moments) + 4 bytes of `step` per parameter tensor.

The estimate is not a formula over Ψ alone: it walks the real parameter shapes (from the meta
device) and reproduces each strategy's sharding rule, so it agrees with what a rank really holds
(the tests measure this within 2 %):

- DDP / ZeRO-1: `gradient_as_bucket_view=True`, so gradients live in DDP's buckets (4Ψ) and are
  never duplicated; ZeroRedundancyOptimizer gives each rank whole parameters, greedily by size.
- FSDP2 (ZeRO-2/3): each parameter is split on dim 0 into `world_size` chunks, padded to equal
  size; optimizer state follows the unpadded local chunk. During forward/backward FSDP holds
  unsharded copies (in the compute dtype): ZeRO-2 (`reshard_after_forward=False`) holds every
  group's full parameters between forward and backward; ZeRO-3 frees each block after its
  forward and keeps only the root group (embeddings, final norm, head) unsharded for backward.

Two moments are modelled per step: `after_forward` (before backward) and `after_backward`
(before the optimizer step, grads and optimizer state both alive). The larger is the peak.
These are what the runs measure (at those probe points ZeRO-3 holds only shards), so they stay
exactly the measured model states.

On top of them the *working set* (`working_set_bytes`) is what a sharded rank holds only
transiently, inside backward: the all-gathered unit being computed and the prefetched next one
(compute dtype) plus one unit's unsharded gradients (the reduce-scatter input). It is estimated
per moment from the real unit sizes (FSDP2: the `ParamSpec.group` units; DeepSpeed stage 3: its
fetch unit, each module's own parameters, with its prefetch limits) and added to the planned
peak (`peak_total_bytes`), never to `moments`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from orchestrator.common.plan import MemoryEstimate, MomentBytes
from orchestrator.config.derived import TORCH_STRATEGIES
from orchestrator.models.specs import ROOT_GROUP, ParamSpec
from orchestrator.planning.deepspeed_stage3 import stage3_step, stage3_working_set

# compute dtype; fp8 computes in bf16 outside its linear layers' float8 matmuls, whose float8
# copies of inputs and weights live only within one layer's forward/backward
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "bf16_pure": 2, "fp8": 2}


def master_bytes(precision: str) -> int:
    """Bytes per element of the weights the optimizer updates (and of grads and Adam moments)."""
    return 2 if precision == "bf16_pure" else 4
MOMENTS = ("after_forward", "after_backward")


def zero_paper_bytes(psi: int, world_size: int, stage: int, precision: str) -> int:
    """ZeRO paper, section 5: params + grads + K·Ψ optimizer bytes with 16-bit weights and
    gradients and K = 12 for mixed-precision Adam (fp32 master + two moments); for fp32
    training we use 4 + 4 + 8. Stage 1 divides the optimizer term by N, 2 also the gradients,
    3 also the parameters."""
    p, g, k = (4, 4, 8) if precision == "fp32" else (2, 2, 12)
    if precision == "bf16_pure":
        p, g, k = 2, 2, 4
    n = world_size
    terms = {0: (p, g, k), 1: (p, g, k / n), 2: (p, g / n, k / n), 3: (p / n, g / n, k / n)}
    return int(sum(terms[stage]) * psi)


def with_activations(est: MemoryEstimate, activations: int, overhead: float,
                     psi: int, world_size: int, stage: int, precision: str) -> MemoryEstimate:
    """Add one micro batch's activations (alive at `after_forward`), the working set of the
    moment that then peaks, and the allowance. `world_size`: the ranks the ZeRO paper's N
    shards over (the shard group under HSDP)."""
    ws = est.working_set_by_moment
    totals = {"after_forward": est.moments["after_forward"].total_bytes + activations
              + ws.get("after_forward", 0),
              "after_backward": est.moments["after_backward"].total_bytes
              + ws.get("after_backward", 0)}
    at = max(MOMENTS, key=lambda m: totals[m])
    states_peak = totals[at]
    extra = int(overhead * states_peak)
    return dataclasses.replace(
        est, activations_bytes=activations, overhead_bytes=extra,
        working_set_bytes=ws.get(at, 0), peak_total_bytes=states_peak + extra,
        zero_paper_bytes=zero_paper_bytes(psi, world_size, stage, precision))


def _optimizer_bytes(numels: list[int], optimizer: str, momentum: float, width: int = 4) -> int:
    """AdamW: two moments (in the weights' dtype) plus a 4-byte `step` tensor per parameter;
    SGD: one momentum buffer (none without momentum)."""
    if optimizer == "adamw":
        return sum(2 * width * n + 4 for n in numels)
    return sum(width * n for n in numels) if momentum > 0 else 0


def zero1_partition(specs: list[ParamSpec], world_size: int) -> list[list[int]]:
    """Parameter indices per rank, exactly as `ZeroRedundancyOptimizer` assigns them: largest
    first (stable for ties), each to the rank with the fewest elements so far."""
    order = sorted(range(len(specs)), key=lambda i: specs[i].numel, reverse=True)
    sizes, owned = [0] * world_size, [[] for _ in range(world_size)]
    for i in order:
        rank = sizes.index(min(sizes))
        owned[rank].append(i)
        sizes[rank] += specs[i].numel
    return owned


def _chunk(dim0: int, world_size: int, rank: int) -> tuple[int, int]:
    """(padded, local) rows of a dim-0 shard, as FSDP2 / `torch.chunk` split it."""
    padded = math.ceil(dim0 / world_size)
    start = min(rank * padded, dim0)
    return padded, min(dim0, start + padded) - start


def _replicated(specs: list[ParamSpec], opt_numels: list[int], optimizer: str,
                momentum: float, w: int, buckets: bool = True) -> dict[str, MomentBytes]:
    total = sum(s.numel for s in specs)
    trained = sum(s.numel for s in specs if s.trainable)  # DDP buckets only these
    opt = _optimizer_bytes(opt_numels, optimizer, momentum, w)
    # Bucket-view gradients persist between steps (zero_grad keeps them), so both moments hold
    # them; an unwrapped model's (tensor parallel alone) are freed by zero_grad after the step.
    return {m: MomentBytes(w * total, w * trained if buckets or m == "after_backward" else 0,
                           opt) for m in MOMENTS}


def _largest_bucket(sizes: list[int], cap: int) -> int:
    """The largest of consecutive groups of `sizes` up to `cap` bytes each (one larger alone)."""
    largest, size = 0, 0
    for n in sizes:
        size = n if size and size + n > cap else size + n
        largest = max(largest, size)
    return largest


def _gathered_by_group(specs: list[ParamSpec], shard_size: int,
                       trainable_only: bool = False,
                       bytes_of: Callable[[ParamSpec], int] | None = None) -> dict[str, int]:
    """Elements (or, with `bytes_of`, bytes) of each FSDP unit once all-gathered: the padded
    dim-0 shards times the group."""
    out: dict[str, int] = {}
    for s in specs:
        if s.trainable or not trainable_only:
            rows_padded, _ = _chunk(s.shape[0], shard_size, 0)
            n = rows_padded * shard_size * (s.numel // s.shape[0])
            out[s.group] = out.get(s.group, 0) + n * (bytes_of(s) if bytes_of else 1)
    return out


def _gather_bytes(compute_bytes: int, float8: bool) -> Callable[[ParamSpec], int]:
    """Bytes an all-gathered element takes: the compute dtype's, or one for the weight of a
    linear layer (not the head) when FSDP2 all-gathers float8 weights
    (`precision.fp8_all_gather`; counted for every such layer, torchao's size filter aside)."""
    return lambda s: 1 if float8 and s.out_features and not s.head else compute_bytes


def _fsdp(specs: list[ParamSpec], world_size: int, rank: int, stage: int,
          bytes_of: Callable[[ParamSpec], int], optimizer: str, momentum: float,
          w: int, pipeline: bool = False) -> dict[str, MomentBytes]:
    padded_shard, grad_shard, local = 0, 0, []
    for s in specs:
        rows_padded, rows_local = _chunk(s.shape[0], world_size, rank)
        inner = s.numel // s.shape[0]
        padded_shard += rows_padded * inner
        if s.trainable:  # frozen parameters are sharded too, but take no grad or state
            grad_shard += rows_padded * inner
            local.append(rows_local * inner)
    unsharded = _gathered_by_group(specs, world_size, bytes_of=bytes_of)
    opt = _optimizer_bytes(local, optimizer, momentum, w)
    held = sum(unsharded.values()) if stage == 2 else unsharded.get(ROOT_GROUP, 0)
    if pipeline:  # measured before the schedule runs, when every unit is sharded
        held = 0
    return {
        "after_forward": MomentBytes(w * padded_shard + held, 0, opt),
        "after_backward": MomentBytes(w * padded_shard, w * grad_shard, opt),
    }


def _fsdp_working_set(specs: list[ParamSpec], shard_size: int, stage: int,
                      bytes_of: Callable[[ParamSpec], int], reduce_bytes: int,
                      pipeline: bool = False) -> dict[str, int]:
    """FSDP2's transient bytes inside backward, beyond each modelled moment.

    Units are the `fully_shard` groups: one per block, plus the root (embeddings, final norm,
    head), which is never resharded after forward, so `after_forward` already holds it.
    - beyond `after_forward` (backward through the blocks, activations alive): ZeRO-3 gathers
      the block being computed and prefetches the next one (compute dtype); ZeRO-2 holds every
      block already. Both reduce-scatter one block's unsharded gradients (reduce dtype).
    - beyond `after_backward` (the end of backward): the root is still gathered while its own
      gradients are reduce-scattered, after which it is resharded.
    Under a pipeline schedule (`pipeline`) every unit of the stage is gathered from the first
    micro-batch's forward and its unsharded gradients accumulate until the last backward.
    """
    params = _gathered_by_group(specs, shard_size, bytes_of=bytes_of)
    grads = _gathered_by_group(specs, shard_size, trainable_only=True)
    if pipeline:  # the stage's units stay gathered, their gradients unreduced, all schedule
        return {"after_forward": sum(params.values()) + reduce_bytes * sum(grads.values()),
                "after_backward": 0}
    blocks = sorted((n for g, n in params.items() if g != ROOT_GROUP), reverse=True)
    block_grads = max((n for g, n in grads.items() if g != ROOT_GROUP), default=0)
    gathered = sum(blocks[:2]) if stage == 3 else 0  # the unit computed + the prefetched next
    return {
        "after_forward": gathered + reduce_bytes * block_grads,
        "after_backward": params.get(ROOT_GROUP, 0) + reduce_bytes * grads.get(ROOT_GROUP, 0),
    }


def estimate(specs: list[ParamSpec], world_size: int, zero_stage: int, precision: str,
             optimizer: str = "adamw", momentum: float = 0.9,
             shard_size: int | None = None, param_dtype: str = "auto",
             float8_gather: bool = False, buckets: bool = True,
             pipeline: bool = False, flat_bucket_bytes: int = 0) -> MemoryEstimate:
    """Model-state bytes on the most loaded rank at each modelled moment of a training step.

    `shard_size`: FSDP2 (stages 2/3) shards over groups of this many ranks and replicates over
    world_size / shard_size groups (HSDP); default: all ranks. A rank then holds exactly what
    it would in a `shard_size`-rank job. `param_dtype`: FSDP2's `precision.param_dtype`, the
    dtype units are gathered in (auto: the compute dtype); `float8_gather`:
    `precision.fp8_all_gather` (linear weights gathered in one byte); `buckets`: stages 0/1
    keep gradients in DDP's buckets (False: the model is not wrapped, tensor parallel alone);
    `pipeline`: `specs` are one pipeline stage's, whose moments are measured around the
    schedule (run/strategies/pipeline.py), with everything gathered in between;
    `flat_bucket_bytes`: stages 0 whose gradients are averaged after backward through flat
    buffers of at most this many bytes (a replicated pipeline stage). Under tensor
    parallelism `specs` are one rank's slices (models/tensor_parallel.py) and
    `world_size` the data-parallel size."""
    w = master_bytes(precision)
    gathered = DTYPE_BYTES[param_dtype if param_dtype != "auto" else precision]
    working: dict[str, int] = {}
    shard = 0
    if zero_stage in (0, 1):
        trained = [s for s in specs if s.trainable]  # the optimizer gets only these
        owned = zero1_partition(trained, world_size) if zero_stage == 1 else [range(len(trained))]
        per_rank = [_optimizer_bytes([trained[i].numel for i in o], optimizer, momentum, w)
                    for o in owned]
        rank = per_rank.index(max(per_rank))  # ZeRO-1's greedy split can be uneven
        moments = _replicated(specs, [trained[i].numel for i in owned[rank]], optimizer,
                              momentum, w, buckets)
        if flat_bucket_bytes:
            working = {"after_backward": _largest_bucket([w * s.numel for s in trained],
                                                         flat_bucket_bytes)}
    else:
        rank = 0  # dim-0 chunks are largest on rank 0; padded shards are equal everywhere
        shard = shard_size or world_size
        bytes_of = _gather_bytes(gathered, float8_gather)
        moments = _fsdp(specs, shard, rank, zero_stage, bytes_of, optimizer, momentum, w,
                        pipeline)
        # precision.fsdp_policy reduces in fp32 for bf16/fp16, in the param dtype otherwise
        working = _fsdp_working_set(specs, shard, zero_stage, bytes_of, w, pipeline)
    peak = max(MOMENTS, key=lambda m: moments[m].total_bytes)
    return MemoryEstimate(TORCH_STRATEGIES[zero_stage], rank, peak, moments,
                          working_set_by_moment=working,
                          working_set_bytes=working.get(peak, 0), shard_size=shard)



def _ds_flat_partition(specs: list[ParamSpec], n: int) -> tuple[int, list[int]]:
    """DeepSpeed ZeRO-1/2 flattens all parameters (in order) into one buffer aligned to 2N
    elements and cuts it into N equal partitions. Returns (partition size, extra gradient
    elements per rank): a rank also holds the whole gradient of each parameter that straddles
    its partition's edge, not just its slice of it."""
    total = sum(s.numel for s in specs)
    part = math.ceil(total / (2 * n)) * 2
    extra, offset = [0] * n, 0
    for s in specs:
        start, end = offset, offset + s.numel
        offset = end
        for rank in range(start // part, min(n, (end - 1) // part + 1)):
            inside = min(end, (rank + 1) * part) - max(start, rank * part)
            if inside < s.numel:
                extra[rank] += s.numel - inside
    return part, extra


def _persistent_bytes(specs: list[ParamSpec], b: int, n: int, threshold: int) -> int:
    """Stage 3's persistent parameters, whole and partitioned: they stay on the device under
    parameter offload (partition_parameters.py: `_partition_param` puts a persistent
    parameter's ds_tensor on the local device)."""
    return b * sum(s.numel + math.ceil(s.numel / n) for s in specs if s.numel <= threshold)


def estimate_deepspeed(specs: list[ParamSpec], world_size: int, zero_stage: int, precision: str,
                       offload_optimizer: bool = False, offload_params: bool = False,
                       optimizer: str = "adamw", momentum: float = 0.9,
                       persistence_threshold: int = 0, prefetch_bucket_size: int = 50_000_000,
                       max_live_parameters: int = 1_000_000_000,
                       max_reuse_distance: int = 1_000_000_000,
                       hpz_partition_size: int = 1) -> MemoryEstimate:
    """DeepSpeed's model states on its most loaded rank.

    Unlike FSDP2/ZeRO-1, DeepSpeed keeps a flat fp32 master partition beside the model's own
    weights even for fp32 models; it is counted with the optimizer state (one flat tensor, so
    one `step`). Stage 3 keeps parameters with at most `persistence_threshold` elements whole on
    every rank, and what forward leaves gathered for backward (planning/deepspeed_stage3.py:
    the head at least; with DeepSpeed's default prefetch and reuse distance every parameter of
    a small model) is in the `after_forward` moment.
    With `hpz_partition_size` H > 1 (ZeRO++ hpZ) stage 3 also keeps a secondary copy of every
    partitioned parameter split over groups of H ranks, in the module's dtype
    (`_partition_param_sec`: the padded size / H elements), so the backward all-gather stays
    inside the group; the primary partition, gradients and optimizer stay split over all ranks.
    Offloaded terms move to `host_bytes` (on a CPU machine they are the same RAM).
    """
    n, b = world_size, DTYPE_BYTES[precision]  # DeepSpeed casts the module for bf16/fp16
    rank, host, step = 0, 0, None
    trained = [s for s in specs if s.trainable]  # frozen (LoRA base) weights: params only
    if zero_stage == 0:
        psi = sum(s.numel for s in specs)
        opt, master = _optimizer_bytes([s.numel for s in trained], optimizer, momentum), 0
        params = after_fwd_params = b * psi
        grads = 4 * sum(s.numel for s in trained)
    elif zero_stage in (1, 2):
        part, extra = _ds_flat_partition(trained, n)
        rank = extra.index(max(extra))
        opt, master = _optimizer_bytes([part], optimizer, momentum), 4 * part
        params = after_fwd_params = b * sum(s.numel for s in specs)
        grads = 4 * (part + extra[rank])
    else:
        part = sum(math.ceil(s.numel / n) for s in specs)
        owned = sum(math.ceil(s.numel / n) for s in trained)
        persistent = sum(s.numel for s in specs if s.numel <= persistence_threshold)
        step = stage3_step(specs, persistence_threshold, prefetch_bucket_size,
                           max_live_parameters, max_reuse_distance)
        opt, master = _optimizer_bytes([owned], optimizer, momentum), 4 * owned
        secondary = sum(math.ceil(s.numel / n) * n // hpz_partition_size for s in specs
                        if s.numel > persistence_threshold) if hpz_partition_size > 1 else 0
        params = b * (part + persistent + secondary)
        after_fwd_params = params + b * sum(s.numel for s in specs if s.name in step.after_forward)
        grads = 4 * owned
    if offload_optimizer:  # the fp32 gradient partition then lives on the host for good
        host += opt + master + grads
        opt = master = grads = 0
    if offload_params and zero_stage == 3:
        offloaded = params - _persistent_bytes(specs, b, n, persistence_threshold)
        host += offloaded
        after_fwd_params, params = after_fwd_params - offloaded, params - offloaded
    moments = {"after_forward": MomentBytes(after_fwd_params, 0, opt + master),
               "after_backward": MomentBytes(params, grads, opt + master)}
    peak = max(MOMENTS, key=lambda m: moments[m].total_bytes)
    working = (stage3_working_set(specs, b, persistence_threshold, step)
               if step is not None else {})
    return MemoryEstimate("deepspeed", rank, peak, moments, host_bytes=host,
                          working_set_by_moment=working, working_set_bytes=working.get(peak, 0),
                          shard_size=n if zero_stage else 0)


def describe_mesh(strategy: str, world_size: int, zero_stage: int, shard_size: int = 0,
                  hpz_partition_size: int = 1, tensor_parallel: int = 1,
                  pipeline_parallel: int = 1, context_parallel: int = 1) -> str:
    """The layout in words: "2 replicas x 4 shards" (HSDP), "8 replicas" (DDP), with
    `tensor_parallel` > 1 "... x tp 2 (sequence parallel)", with `pipeline_parallel` > 1
    "pp 4 x ...", with `context_parallel` > 1 "... (cp 2: each sequence over 2 of them)";
    `world_size`: the ranks gradients are reduced over (data- and context-parallel)."""
    text = _describe_data_parallel(strategy, world_size, zero_stage, shard_size,
                                   hpz_partition_size)
    if context_parallel > 1:  # the shard group holds each sequence's C ranks
        text += f" (cp {context_parallel}: each sequence over {context_parallel} of them)"
    if pipeline_parallel > 1:
        text = f"pp {pipeline_parallel} x {text}"
    if tensor_parallel > 1:
        text += f" x tp {tensor_parallel} (sequence parallel)"
    return text


def _describe_data_parallel(strategy: str, world_size: int, zero_stage: int, shard_size: int,
                            hpz_partition_size: int) -> str:
    n = world_size

    def plural(k: int, word: str) -> str:
        return f"{k} {word}{'s' if k != 1 else ''}"

    if zero_stage == 0:
        return plural(n, "replica")
    if zero_stage == 1 or (zero_stage == 2 and strategy == "deepspeed"):
        what = "optimizer state" + (" and gradients" if zero_stage == 2 else "")
        return f"{plural(n, 'replica')}, {what} in {n} shards"
    shard = shard_size or n
    text = f"{plural(max(1, n // shard), 'replica')} x {plural(shard, 'shard')}"
    if hpz_partition_size > 1:
        text += (f" + hpZ secondary parameter copy: {n // hpz_partition_size} groups x "
                 f"{plural(hpz_partition_size, 'shard')}")
    return text
