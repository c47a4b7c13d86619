"""Values derived from a job and the machine: the batch arithmetic, the device a run uses, and
the facts about this machine (GPUs, what DeepSpeed's CPU accelerator runs) that decide it.
Torch-free: the few facts that need torch or DeepSpeed are asked only when a job needs them.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from orchestrator.common.errors import ConfigError
from orchestrator.config.schema import JobConfig


@dataclass(frozen=True)
class Hardware:
    """Facts about the launching machine that decide what can run here."""

    cuda_devices: int = 0
    bf16_supported: bool = False
    capability: tuple[int, int] = (0, 0)  # CUDA compute capability of device 0
    cpu_fp16: bool | None = None  # DeepSpeed's CPU accelerator takes fp16 here; None: ask it

    def deepspeed_cpu_fp16(self) -> bool:
        """Whether DeepSpeed's CPU accelerator runs fp16 on this machine: it needs oneDNN's
        fp16 kernels, which CPUs of one machine kind may or may not have."""
        return self.cpu_fp16 if self.cpu_fp16 is not None else _ask_deepspeed_cpu_fp16()

    @staticmethod
    def detect() -> Hardware:
        if not any(os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidiactl",
                                               "/dev/kfd")):
            return Hardware()  # no GPU driver: no CUDA device, and no torch import to say so
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return Hardware(cuda_devices=n, bf16_supported=bool(n and torch.cuda.is_bf16_supported()),
                        capability=tuple(torch.cuda.get_device_capability(0)) if n else (0, 0))


@functools.cache
def _ask_deepspeed_cpu_fp16() -> bool:
    """Asked of DeepSpeed itself (the check `deepspeed.initialize` makes), in a child process
    of the ranks' interpreter, so the launcher imports neither torch nor DeepSpeed; only for a
    job that needs the answer. A probe that fails (no DeepSpeed) refuses nothing."""
    code = ("from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator\n"
            "print(bool(CPU_Accelerator().is_fp16_supported()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    return proc.returncode != 0 or proc.stdout.split()[-1:] != ["False"]


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (a taskset, a Slurm or cgroup CPU set, a
    search trial's share of the machine), else every CPU of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity on this platform
        return os.cpu_count() or 1


def ranks_per_share(job: JobConfig) -> int:
    """The ranks that compute on one share of the data: the ranks of one tensor-parallel
    group, the stages of one pipeline, and the ranks splitting one sequence."""
    p = job.parallelism
    return p.tensor_parallel * p.pipeline_parallel * p.context_parallel


def data_parallel_size(job: JobConfig) -> int:
    """The ranks that see different data: the world over `ranks_per_share`."""
    return job.world_size // ranks_per_share(job)


def gradient_ranks(job: JobConfig) -> int:
    """The ranks a parameter's gradient is reduced over (FSDP2's data-parallel dimensions): the
    data-parallel ranks and, under context parallelism, each sequence's C ranks too."""
    return data_parallel_size(job) * job.parallelism.context_parallel


def data_parallel_rank(job: JobConfig, rank: int) -> int:
    """Which share of the data global rank `rank` reads. The device mesh (run/mesh.py) is
    pp x dp x cp x tp, outermost first: tensor-parallel groups are runs of consecutive ranks,
    the C ranks of one sequence (context parallel) runs of C·T, and each pipeline stage holds
    one block of dp x cp x tp ranks."""
    p = job.parallelism
    return rank // (p.tensor_parallel * p.context_parallel) % data_parallel_size(job)


# several stages per rank: stage k on rank k mod P, or V-shaped (zbv: rank r holds r, 2P-1-r)
MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "interleaved_zb", "zbv")


def pipeline_stages_per_rank(job: JobConfig) -> int:
    """V, the stages each rank holds (None: 2 for an interleaved schedule, else 1)."""
    p = job.parallelism
    if p.pipeline_stages_per_rank is not None:
        return p.pipeline_stages_per_rank
    return 2 if p.pipeline_schedule in MULTI_STAGE_SCHEDULES else 1


def pipeline_microbatches(job: JobConfig) -> int:
    """The micro-batches each step's batch runs as through the pipeline (None: 2 x stages)."""
    p = job.parallelism
    return p.pipeline_microbatches or 2 * p.pipeline_parallel


def resolve_batch(job: JobConfig) -> tuple[int, int]:
    """(grad_accum_steps, global_batch_size) with global = micro x accum x data-parallel size."""
    t, dp = job.train, data_parallel_size(job)
    per_step = t.micro_batch_size * dp
    if t.global_batch_size is None:
        accum = t.grad_accum_steps or 1
        return accum, per_step * accum
    if t.global_batch_size % per_step:
        raise ConfigError(
            "train.global_batch_size",
            t.global_batch_size,
            f"a multiple of micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}"
            f" = {per_step}",
        )
    accum = t.global_batch_size // per_step
    if t.grad_accum_steps is not None and t.grad_accum_steps != accum:
        raise ConfigError(
            "train.grad_accum_steps",
            t.grad_accum_steps,
            f"{accum} (= global_batch_size {t.global_batch_size} / (micro_batch_size "
            f"{t.micro_batch_size} x data-parallel size {dp})), or leave it unset",
        )
    return accum, t.global_batch_size


def resolve_device(job: JobConfig, hw: Hardware) -> str:
    """cluster.device, with auto = cuda when a GPU is named in cluster.gpu, or (launcher=local
    only) visible here. A remote launcher (slurm, torchrun, k8s) describes the *target* cluster:
    the submitting host's hardware, often a login node without a GPU, never decides it."""
    if job.cluster.device == "auto":
        here = hw.cuda_devices if job.launcher.name == "local" else 0
        return "cuda" if here or job.cluster.gpu != "none" else "cpu"
    return job.cluster.device


TORCH_STRATEGIES = {0: "ddp", 1: "zero1", 2: "fsdp2", 3: "fsdp2"}  # by parallelism.zero_stage


def strategy_name(job: JobConfig) -> str:
    """The strategy that runs the job: "deepspeed" (any ZeRO stage), or by ZeRO stage "ddp",
    "zero1" (DDP + ZeroRedundancyOptimizer) or "fsdp2" (stages 2 and 3; and every
    tensor-parallel job, whose device mesh that strategy builds)."""
    if job.parallelism.backend == "deepspeed":
        return "deepspeed"
    if job.parallelism.pipeline_parallel > 1:
        return "pipeline"
    if job.parallelism.context_parallel > 1:  # FSDP2 over every rank, ring attention within
        return "context_parallel"
    if job.parallelism.tensor_parallel > 1:  # the device mesh: TP, then FSDP2 over dp ranks
        return "fsdp2"
    return TORCH_STRATEGIES[job.parallelism.zero_stage]


def torch_loss_scaler(job: JobConfig) -> bool:
    """Whether torch's GradScaler steps the optimizer: fp16 under a torch strategy (DeepSpeed
    brings its own loss scaler)."""
    return job.precision.name == "fp16" and job.parallelism.backend == "torch"


def optimizer_kernel(job: JobConfig) -> str:
    """The optimizer kernel `optim.implementation` stands for: auto is torch's fused kernel,
    but its per-tensor loop under torch's loss scaler (`torch_loss_scaler`)."""
    chosen = job.optim.implementation
    if chosen != "auto":
        return chosen
    return "for_loop" if torch_loss_scaler(job) else "fused"


def missing_build_tool(language: str) -> str | None:
    """What a just-in-time build on this machine lacks, in words; None when nothing does.
    `language` "c++": inductor's CPU kernels and DeepSpeed's CPU Adam (`$CXX`, else g++);
    "c": Triton's CUDA launcher (`$CC`, else gcc or clang). Both include Python's headers."""
    if language == "c++":
        names = [os.environ.get("CXX", "g++")]
        what = "a C++ compiler ($CXX, default g++)"
    else:
        names = [os.environ["CC"]] if os.environ.get("CC") else ["gcc", "clang"]
        what = "a C compiler ($CC, else gcc or clang)"
    if not any(shutil.which(n) for n in names):
        return f"{what}: {' / '.join(names)} is not on PATH"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.is_file():
        return (f"Python's headers: {headers} is missing (Debian/Ubuntu: apt-get install "
                f"python{sys.version_info.major}.{sys.version_info.minor}-dev)")
    return None
