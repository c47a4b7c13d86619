"""Accelerator facts for planning: dense peak FLOP/s per precision (no sparsity) and memory.

Peak figures are the vendors' dense tensor-core numbers; "fp32" is plain FP32 (not TF32), and
None means the chip has no fast path for that precision. Memory is what `nvidia-smi` calls the
total; the planner subtracts its own allowance for buffers and fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

TFLOPS = 1e12
GB = 1e9


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    bf16: Optional[float]
    fp16: Optional[float]
    fp32: float
    fp8: Optional[float]

    def peak_flops(self, precision: str) -> Optional[float]:
        key = {"bf16": "bf16", "bf16_pure": "bf16", "fp16": "fp16", "fp32": "fp32"}[precision]
        return getattr(self, key)


GPUS: dict[str, GPU] = {
    "v100": GPU("NVIDIA V100 SXM2 32GB", int(32 * GB), None, 125 * TFLOPS, 15.7 * TFLOPS, None),
    "a100_40gb": GPU("NVIDIA A100 SXM 40GB", int(40 * GB), 312 * TFLOPS, 312 * TFLOPS,
                     19.5 * TFLOPS, None),
    "a100_80gb": GPU("NVIDIA A100 SXM 80GB", int(80 * GB), 312 * TFLOPS, 312 * TFLOPS,
                     19.5 * TFLOPS, None),
    "h100": GPU("NVIDIA H100 SXM 80GB", int(80 * GB), 989.4 * TFLOPS, 989.4 * TFLOPS,
                66.9 * TFLOPS, 1978.9 * TFLOPS),
    "h100_pcie": GPU("NVIDIA H100 PCIe 80GB", int(80 * GB), 756.5 * TFLOPS, 756.5 * TFLOPS,
                     51.2 * TFLOPS, 1513 * TFLOPS),
    "h200": GPU("NVIDIA H200 SXM 141GB", int(141 * GB), 989.4 * TFLOPS, 989.4 * TFLOPS,
                66.9 * TFLOPS, 1978.9 * TFLOPS),
    "l4": GPU("NVIDIA L4 24GB", int(24 * GB), 121 * TFLOPS, 121 * TFLOPS, 30.3 * TFLOPS,
              242.5 * TFLOPS),
}


def match(device_name: str, total_memory_bytes: int) -> Optional[str]:
    """The table key for a CUDA device (from `torch.cuda.get_device_properties`), if listed."""
    name = device_name.upper()
    if "H200" in name:
        return "h200"
    if "H100" in name:
        return "h100_pcie" if "PCIE" in name else "h100"
    if "A100" in name:
        return "a100_80gb" if total_memory_bytes > 50 * GB else "a100_40gb"
    if "V100" in name:
        return "v100"
    if "L4" in name.split():
        return "l4"
    return None
