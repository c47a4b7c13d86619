"""The Plan: everything a launcher needs and what the ranks compare their measurements with.
Plain data, computed on the host (orchestrator/planning/plan.py), written to the run
directory's `plan.json` and read back as the same types (`read_plan`) by the ranks, which never
load the planner.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from orchestrator.common.secrets import redact


@dataclass(frozen=True)
class MomentBytes:
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    strategy: str
    rank: int  # the rank the figures describe: the one with the largest peak
    peak_moment: str
    moments: dict[str, MomentBytes] = field(default_factory=dict)
    host_bytes: int = 0  # offloaded to CPU memory (DeepSpeed offload), not on the device
    activations_bytes: int = 0  # one micro batch, alive from the end of forward
    overhead_bytes: int = 0  # stated allowance for buffers and fragmentation
    peak_total_bytes: int = 0  # max over moments of model state (+ activations) + working set
    #                            + overhead
    zero_paper_bytes: int = 0  # the ZeRO paper's figure for this stage, for comparison
    # transient gathered units + unsharded grads inside backward, beyond each moment's states
    working_set_by_moment: dict[str, int] = field(default_factory=dict)
    working_set_bytes: int = 0  # the working set at the planned peak (0: DDP, ZeRO-1)
    shard_size: int = 0  # ranks each parameter/gradient/optimizer shard is split over (0: none)

    @property
    def peak_bytes(self) -> int:
        return self.moments[self.peak_moment].total_bytes


@dataclass(frozen=True)
class ComputeEstimate:
    params: int  # unique parameters (tied embeddings counted once)
    tokens_per_step: int
    tokens: int  # D: tokens the job will train on
    flops_per_token: float
    flops: float  # training FLOPs for D tokens
    chinchilla_tokens: int  # ≈ 20 tokens per parameter
    tokens_vs_chinchilla: float  # D / chinchilla_tokens (1.0 = compute-optimal)
    chinchilla_verdict: str  # "under", "at" or "over" the optimum, and by how much
    trainable_params: Optional[int] = None  # None = all of them
    reference: bool = False  # DPO: a frozen reference model runs forward beside the policy
    budget_flops: Optional[float] = None
    optimal_params: Optional[int] = None  # compute-optimal N for budget_flops
    optimal_tokens: Optional[int] = None  # compute-optimal D for budget_flops
    peak_flops_per_device: Optional[float] = None
    mfu: Optional[float] = None  # assumed for the estimates below
    step_time_s: Optional[float] = None
    wall_time_s: Optional[float] = None
    gpu_hours: Optional[float] = None
    cost_usd: Optional[float] = None


@dataclass(frozen=True)
class Plan:
    world_size: int
    nnodes: int
    nproc_per_node: int
    device: str  # cpu | cuda
    backend: str  # gloo | nccl
    strategy: str  # ddp | zero1 | fsdp2
    zero_stage: int
    precision: str
    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int
    commands: list[list[str]]  # exact argv per node
    env: dict[str, str]
    run_dir: str
    config_path: str
    memory: MemoryEstimate
    compute: ComputeEstimate
    # written to <run_dir>/deepspeed.json; secrets redacted (the rank restores them, see
    # strategies/deepspeed.py: they reach it only through its environment)
    deepspeed_config: Optional[dict[str, Any]] = None
    gpu: Optional[str] = None  # the accelerator planned for (cluster.gpu)
    device_memory_bytes: Optional[int] = None
    auto_reason: Optional[str] = None  # set when parallelism.auto chose the strategy
    mesh: str = ""  # the device mesh, e.g. "2 replicas x 4 shards" (HSDP), "... x tp 2"
    tensor_parallel: int = 1  # ranks per tensor-parallel group (the data-parallel size: world/T)
    # pipeline parallelism: stages, schedule, micro-batches, bubble_fraction; None without
    pipeline: Optional[dict[str, Any]] = None
    # bytes one rank sends per optimizer step on each mesh dimension (planning/communication.py)
    comm_bytes: dict[str, int] = field(default_factory=dict)
    # seconds per step: compute, bubble, each dimension's transfers, the total
    # (planning/communication.py: step_estimate); None without a GPU or an MFU to plan with
    step_estimate: Optional[dict[str, float]] = None
    # int8 PTQ (quantize.method, or a quantized model): quantization/int8.py's QuantizedSize
    quantize: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        # A Plan is written, printed and logged: it never holds a secret (common/secrets.py).
        if self.deepspeed_config is not None:
            object.__setattr__(self, "deepspeed_config", redact(self.deepspeed_config))

    @property
    def fits(self) -> Optional[bool]:
        """Whether the per-rank peak fits the planned device; None when it is unknown."""
        if self.device_memory_bytes is None:
            return None
        return self.memory.peak_total_bytes <= self.device_memory_bytes

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        mem = d["memory"]
        for name, moment in self.memory.moments.items():
            mem["moments"][name]["total_bytes"] = moment.total_bytes
        mem["peak_bytes"] = self.memory.peak_bytes
        d["fits"] = self.fits
        return d

    def write(self, path: str | Path) -> None:
        """plan.json, with every secret-named value redacted."""
        d = self.to_dict()
        d["deepspeed_config"], d["env"] = redact(d["deepspeed_config"]), redact(d["env"])
        Path(path).write_text(json.dumps(d, indent=2) + "\n")

    def deepspeed_json(self) -> str:
        """The text of <run_dir>/deepspeed.json (secrets redacted)."""
        return json.dumps(redact(self.deepspeed_config), indent=2) + "\n"


def read_plan(path: str | Path) -> Plan:
    """`plan.json` as the `Plan` it was written from (`Plan.write`); the derived figures it
    also holds (totals, peak, fits) are recomputed by the types, not read."""
    d = json.loads(Path(path).read_text())
    mem = dict(d["memory"])
    mem.pop("peak_bytes", None)
    mem["moments"] = {name: MomentBytes(**{k: v for k, v in m.items() if k != "total_bytes"})
                      for name, m in mem["moments"].items()}
    fields = {f.name for f in dataclasses.fields(Plan)}
    kept = {k: v for k, v in d.items() if k in fields}
    return Plan(**{**kept, "memory": MemoryEstimate(**mem),
                   "compute": ComputeEstimate(**d["compute"])})
