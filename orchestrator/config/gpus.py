"""Accelerator facts for planning: dense peak FLOP/s per precision (no sparsity) and memory.

Peak figures are the vendors' dense tensor-core numbers; "fp32" is plain FP32 (not TF32), and
None means the chip has no fast path for that precision.

Memory: HBM (and the L4's GDDR6) is sized in GiB, so an "80 GB" part has 80 GiB = 85.9e9 bytes,
not 80e9. The table holds the vendor's capacity read as GiB; what
`torch.cuda.get_device_properties(0).total_memory` reports is a little less (the driver keeps
some back: about 85e9 for an 80 GB H100, about 150e9 for a 141 GB H200; more with ECC on GDDR),
which the planner's `plan.memory_overhead` allowance absorbs. Planning on the machine itself
(`launcher=local`), `device_memory_bytes` prefers the figure the device reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

TFLOPS = 1e12
GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    bf16: Optional[float]
    fp16: Optional[float]
    fp32: float
    fp8: Optional[float]
    # bytes/s one GPU sends to another in its node, one direction: NVLink (SXM parts; half the
    # data sheet's bidirectional figure) or PCIe x16 (PCIe parts)
    link_bytes_per_s: float

    def peak_flops(self, precision: str) -> Optional[float]:
        """The peak MFU is measured against: fp8 training's too is the bf16 peak, since its
        attention, norms and head run in bf16 and only some matmuls in float8 (an fp8 peak
        would understate what the run achieves against the dense bf16 work it replaces)."""
        key = {"bf16": "bf16", "bf16_pure": "bf16", "fp16": "fp16", "fp32": "fp32",
               "fp8": "bf16"}[precision]
        return getattr(self, key)


# memory_bytes: the capacity on the vendor's data sheet (32, 40, 80, 141, 24 "GB"), in GiB.
GPUS: dict[str, GPU] = {
    "v100": GPU("NVIDIA V100 SXM2 32GB", 32 * GiB, None, 125 * TFLOPS, 15.7 * TFLOPS, None,
                150 * GB),
    "a100_40gb": GPU("NVIDIA A100 SXM 40GB", 40 * GiB, 312 * TFLOPS, 312 * TFLOPS,
                     19.5 * TFLOPS, None, 300 * GB),
    "a100_80gb": GPU("NVIDIA A100 SXM 80GB", 80 * GiB, 312 * TFLOPS, 312 * TFLOPS,
                     19.5 * TFLOPS, None, 300 * GB),
    "h100": GPU("NVIDIA H100 SXM 80GB", 80 * GiB, 989.4 * TFLOPS, 989.4 * TFLOPS,
                66.9 * TFLOPS, 1978.9 * TFLOPS, 450 * GB),
    "h100_pcie": GPU("NVIDIA H100 PCIe 80GB", 80 * GiB, 756.5 * TFLOPS, 756.5 * TFLOPS,
                     51.2 * TFLOPS, 1513 * TFLOPS, 64 * GB),
    "h200": GPU("NVIDIA H200 SXM 141GB", 141 * GiB, 989.4 * TFLOPS, 989.4 * TFLOPS,
                66.9 * TFLOPS, 1978.9 * TFLOPS, 450 * GB),
    "l4": GPU("NVIDIA L4 24GB", 24 * GiB, 121 * TFLOPS, 121 * TFLOPS, 30.3 * TFLOPS,
              242.5 * TFLOPS, 32 * GB),
}


def match(device_name: str, total_memory_bytes: int) -> Optional[str]:
    """The table key for a CUDA device (from `torch.cuda.get_device_properties`), if listed.

    Not listed, so None: the GH200 (a Grace Hopper superchip, 96 or 144 GB of HBM and its own
    clocks: not an H200, whose name its own contains) and the H100 NVL (94 GB)."""
    name = device_name.upper()
    words = name.replace("-", " ").split()
    if "GH200" in name or "NVL" in words:
        return None
    if "H200" in name:
        return "h200"
    if "H100" in name:
        return "h100_pcie" if "PCIE" in words else "h100"
    if "A100" in name:  # both say "A100-SXM4-..." or "A100-PCIE-...": tell them by memory
        return "a100_80gb" if total_memory_bytes > 60 * GiB else "a100_40gb"
    if "V100" in name:
        return "v100"
    if "L4" in words:
        return "l4"
    return None


def detected_device() -> Optional[tuple[str, int]]:
    """(name, total_memory) of local CUDA device 0, or None without one."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, int(props.total_memory)


_DETECT = object()


def device_memory_bytes(gpu_key: str, detected: object = _DETECT) -> Optional[int]:
    """Device memory to plan `gpu_key` against: the local device's own `total_memory` when
    there is one and it is that kind of GPU, else the table's figure (None for an unknown key).
    `detected` is a (name, total_memory) pair or None for "no device"; by default it is read
    from CUDA device 0."""
    gpu = GPUS.get(gpu_key)
    if gpu is None:
        return None
    local = detected_device() if detected is _DETECT else detected
    if local is not None:
        name, total = local  # type: ignore[misc]
        if match(name, total) == gpu_key:
            return int(total)
    return gpu.memory_bytes
