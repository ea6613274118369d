"""Throughput and memory numbers the trainer prints: tokens/s, TFLOP/s per GPU, MFU and the
per-rank memory estimate of the start-up line.

The FLOPs come from ``megatron_transmamba.flops.training_flops_per_token`` (model FLOPs: matmuls,
the attention term quadratic in each TransPoint, the SSM term linear in T - p; backward = 2x
forward; recomputation not counted), the same count the scaling sweeps use. MFU divides the
achieved model TFLOP/s per GPU by the device's peak dense TFLOP/s (``logging.peak_tflops``, or
``PEAK_TFLOPS`` by device name for the run's precision; on CPU there is no peak and no MFU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# Dense peak TFLOP/s (no sparsity) from the vendors' data sheets, SXM parts:
# (bf16 tensor core, tf32 tensor core). fp32 runs are counted against tf32.
PEAK_TFLOPS = {
    "H200": (989.0, 494.5),
    "H100": (989.0, 494.5),
    "A100": (312.0, 156.0),
    "B200": (2250.0, 1100.0),
}


def peak_tflops(configured: Optional[float], bf16: bool,
                device: Optional[torch.device] = None) -> Optional[float]:
    """``configured`` if set, else the table entry of this CUDA device (None if unknown/CPU)."""
    if configured:
        return float(configured)
    if device is None or device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16_peak, tf32_peak) in PEAK_TFLOPS.items():
        if key in name:
            return bf16_peak if bf16 else tf32_peak
    return None


@dataclass(frozen=True)
class Throughput:
    tokens_per_s: float
    tflops_per_gpu: float
    mfu: Optional[float]          # fraction of the peak, None without a peak

    def describe(self) -> str:
        text = f"{self.tokens_per_s:,.0f} tokens/s | {self.tflops_per_gpu:.2f} TFLOP/s per GPU"
        return text + (f" | MFU {100 * self.mfu:.1f}%" if self.mfu is not None else "")


def throughput(tokens: float, seconds: float, flops_per_token: float, world_size: int,
               peak: Optional[float]) -> Throughput:
    """Whole-job ``tokens`` processed in ``seconds`` by ``world_size`` processes."""
    tokens_per_s = tokens / max(seconds, 1e-9)
    tflops = tokens_per_s * flops_per_token / world_size / 1e12
    return Throughput(tokens_per_s, tflops, tflops / peak if peak else None)


def memory_estimate_bytes(local_parameters: int, bf16: bool, data_parallel_size: int,
                          distributed_optimizer: bool) -> dict:
    """Static memory of one rank for ``local_parameters`` (its model-parallel share), by part.

    weights 2 (bf16) or 4 bytes; gradients 4 (megatron-core DDP reduces in fp32); optimizer
    fp32 main weights (bf16 only) + Adam's two moments = 12 or 8 bytes, divided by the
    data-parallel size under the distributed optimizer. Activations are not included: they
    depend on micro-batch, sequence length and recomputation.
    """
    optimizer = (12 if bf16 else 8) * local_parameters
    if distributed_optimizer:
        optimizer = optimizer / data_parallel_size
    parts = {"weights": (2 if bf16 else 4) * local_parameters, "gradients": 4 * local_parameters,
             "optimizer": int(optimizer)}
    parts["total"] = sum(parts.values())
    return parts


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
