"""DeepSpeed ZeRO-3's parameter gathering over one step, replayed from its rules
(deepspeed/runtime/zero/partitioned_param_coordinator.py) for the memory plan: what forward
leaves gathered for backward (in the `after_forward` moment, measured on CPU and checked
against the plan by tests/distributed/test_deepspeed.py in two regimes), and the working set
backward adds on top.
"""

from __future__ import annotations

import dataclasses
import itertools

from orchestrator.models.specs import ParamSpec


def modules(specs: list[ParamSpec]) -> list[list[ParamSpec]]:
    """Each module's own parameters (what `fetch_sub_module` gathers), in registration
    order."""
    owned: dict[str, list[ParamSpec]] = {}
    for s in specs:
        owned.setdefault(s.name.rpartition(".")[0], []).append(s)
    return list(owned.values())


def fetch_trace(specs: list[ParamSpec]) -> list[list[ParamSpec]]:
    """DeepSpeed stage 3's fetch trace of one step: the modules (`modules`) forward in
    registration order, the head (a tied one again at the end), then backward in reverse."""
    units = modules(specs)
    heads = [s for s in specs if s.head]
    if heads and heads[-1] is not units[-1][-1]:  # tied: the input embedding, used again
        units.append(heads[-1:])
    return units + units[::-1]


@dataclasses.dataclass
class Stage3Step:
    """What DeepSpeed stage 3 holds gathered over one traced step: the parameters still
    gathered at the end of forward, and the most elements gathered while a backward module
    computes."""

    after_forward: set[str]
    backward_peak: int


def stage3_step(specs: list[ParamSpec], persistence_threshold: int, prefetch_bucket_size: int,
                max_live_parameters: int, max_reuse_distance: int) -> Stage3Step:
    """Replays `PartitionedParameterCoordinator` over the trace (`fetch_trace`): each module
    gathers what it lacks, then prefetches from the trace's parameter queue while fewer than
    min(stage3_max_live_parameters - gathered, stage3_prefetch_bucket_size) elements are in
    flight, marking each parameter it passes as fetched for that later use; after its compute
    it releases its parameters except those so marked and those used again within
    `stage3_max_reuse_distance` elements of the trace (`__params_to_release`). Persistent
    parameters are never gathered. DeepSpeed's defaults (5e7 prefetch, 1e9 reuse distance)
    keep every parameter of a small model gathered from forward into backward."""
    trace = fetch_trace(specs)
    size = {s.name: s.numel for s in specs if s.numel > persistence_threshold}
    ends = list(itertools.accumulate((sum(s.numel for s in unit) for unit in trace), initial=0))
    queue = [(s.name, t) for t, unit in enumerate(trace) for s in unit if s.name in size]
    uses: dict[str, list[int]] = {}
    for name, t in queue:
        uses.setdefault(name, []).append(t)
    head, marked, gathered = 0, dict.fromkeys(size, -1), set()
    forward, peak, after_forward = len(trace) // 2, 0, set()
    for t, unit in enumerate(trace):
        gathered.update(s.name for s in unit if s.name in size)
        while head < len(queue) and queue[head][1] <= t:  # this module's own uses
            head += 1
        limit = min(max_live_parameters - sum(size[n] for n in gathered), prefetch_bucket_size)
        prefetching = 0
        while head < len(queue) and prefetching < limit:
            name, used = queue[head]
            head += 1
            marked[name] = max(marked[name], used)
            if name not in gathered:
                gathered.add(name)
                prefetching += size[name]
        if t >= forward:
            peak = max(peak, sum(size[n] for n in gathered))
        for s in (s for s in unit if s.name in size):  # released unless used again soon
            later = [u for u in uses[s.name] if u > t]
            near = bool(later) and ends[later[0]] - ends[t + 1] < max_reuse_distance
            if not near and marked[s.name] <= t:
                gathered.discard(s.name)
        if t == forward - 1:
            after_forward = set(gathered)
    return Stage3Step(after_forward, peak)


def stage3_working_set(specs: list[ParamSpec], b: int, persistence_threshold: int,
                       step: Stage3Step) -> dict[str, int]:
    """DeepSpeed stage 3's transient bytes inside backward, beyond each moment. Gradients come
    out whole in the module's dtype and are reduce-scattered in `communication_data_type` (by
    default that same 16-bit dtype), so one module's full gradient is alive too.
    - beyond `after_forward` (activations alive): what backward gathers on top of what forward
      left gathered (`stage3_step`), plus the largest module's gradient;
    - beyond `after_backward`: the last module of backward (the input embedding), gathered, and
      its gradient, with nothing left to prefetch.
    """
    units = modules([s for s in specs if s.numel > persistence_threshold])
    if not units:
        return {}
    kept = sum(s.numel for s in specs if s.name in step.after_forward)
    grads = max(sum(s.numel for s in u if s.trainable) for u in units)
    first = units[0]  # forward's first: backward's last
    return {"after_forward": b * (step.backward_peak - kept + grads),
            "after_backward": b * sum(s.numel + s.numel * s.trainable for s in first)}
