"""The optimizer step's scalars in one Triton kernel: the same function as
``naive.step_scalars_naive`` (megatron-core's host arithmetic), where the same math in PyTorch
ops launches about a dozen one-element kernels a step (casts, square roots, the clip division
and clamp, the finite checks, the record's stack). Float64 math with correctly rounded square root and division, as megatron-core's host
computation in Python floats.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["step_scalars_triton"]


@triton.jit
def _step_scalars_kernel(squared_ptr, loss_ptr, stop_ptr, record_ptr, scale_ptr, found_ptr,
                         max_norm_bits, n_parts, SEPARATE: tl.constexpr, CLIP: tl.constexpr,
                         BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    squared = tl.load(squared_ptr + i, mask=i < n_parts, other=0.0).to(tl.float64)
    roots = tl.sqrt(squared)        # float64: sqrt.rn.f64, correctly rounded
    if SEPARATE:
        norm = tl.sqrt(tl.sum(roots * roots, axis=0))
    else:
        norm = tl.sum(roots, axis=0)
    loss = tl.load(loss_ptr).to(tl.float64)
    probe = (loss + norm) * 0.0                      # NaN exactly when either is NaN or inf
    tl.store(record_ptr, loss)
    tl.store(record_ptr + 1, norm)
    tl.store(record_ptr + 2, tl.load(stop_ptr).to(tl.float64))
    tl.store(found_ptr, tl.where(probe != probe, 1.0, 0.0).to(tl.float32))
    if CLIP:
        # a float64 argument: its bits (Triton passes Python floats as float32)
        max_norm = max_norm_bits.to(tl.float64, bitcast=True)
        coefficient = max_norm / (norm + 1.0e-6)
        tl.store(scale_ptr, tl.where(coefficient < 1.0, coefficient, 1.0).to(tl.float32))
    else:
        tl.store(scale_ptr, 1.0)


def _float64_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def step_scalars_triton(squared_norms: Tensor, loss: Tensor, stop_flag: Tensor, max_norm: float,
                        separate_parts: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``step_scalars_naive`` in one launch (see there for shapes and meaning)."""
    if squared_norms.dim() != 1 or loss.numel() != 1 or stop_flag.numel() != 1:
        raise ValueError(f"step_scalars: squared_norms must be [n], loss and stop_flag one "
                         f"element; got {tuple(squared_norms.shape)}, {tuple(loss.shape)}, "
                         f"{tuple(stop_flag.shape)}")
    device = squared_norms.device
    record = torch.empty(3, dtype=torch.float64, device=device)
    scale = torch.empty((), dtype=torch.float32, device=device)
    found_inf = torch.empty((), dtype=torch.float32, device=device)
    n = squared_norms.numel()
    _step_scalars_kernel[(1,)](squared_norms, loss, stop_flag, record, scale, found_inf,
                               _float64_bits(max_norm), n, SEPARATE=separate_parts, CLIP=max_norm > 0,
                               BLOCK=max(16, triton.next_power_of_2(n)))
    return record, scale, found_inf
