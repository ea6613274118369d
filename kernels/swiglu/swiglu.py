"""Fused SwiGLU (Triton), forward and backward: the same function as ``naive.swiglu_naive``.

One forward kernel reads both halves of each row of x [..., 2F] once and writes SiLU(x1) * x2;
one backward kernel recomputes the gate from x and writes both halves of dx, where PyTorch's
unfused form launches a chunk, a SiLU and a product forward and about five kernels backward.
Float32 math in both. The op is a ``torch.library.custom_op`` (``transmamba::swiglu``) with a
fake and an autograd formula, so ``torch.compile(fullgraph=True)`` traces through it.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..custom_op import custom_op

__all__ = ["swiglu_triton"]


@triton.jit
def _swiglu_fwd_kernel(x_ptr, out_ptr, rows, F, stride_x, BLOCK_R: tl.constexpr,
                       BLOCK_F: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (r < rows)[:, None] & (f < F)[None, :]
    base = x_ptr + r[:, None].to(tl.int64) * stride_x + f[None, :]
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + F, mask=mask, other=0.0).to(tl.float32)
    out = x1 * tl.sigmoid(x1) * x2
    tl.store(out_ptr + r[:, None].to(tl.int64) * F + f[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(x_ptr, dout_ptr, dx_ptr, rows, F, stride_x, stride_d,
                       BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (r < rows)[:, None] & (f < F)[None, :]
    r64 = r[:, None].to(tl.int64)
    x1 = tl.load(x_ptr + r64 * stride_x + f[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + r64 * stride_x + F + f[None, :], mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + r64 * stride_d + f[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(x1)
    dx1 = dout * x2 * sig * (1.0 + x1 * (1.0 - sig))
    dx2 = dout * x1 * sig
    tl.store(dx_ptr + r64 * (2 * F) + f[None, :], dx1.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + r64 * (2 * F) + F + f[None, :], dx2.to(dx_ptr.dtype.element_ty), mask=mask)


_BLOCK_R, _BLOCK_F = 8, 128


def _row_stride(x: Tensor) -> Optional[int]:
    """The one stride between the rows of x [..., W] with a unit last stride (leading dims
    collapsible into rows), or None when the rows are not evenly spaced."""
    if x.stride(-1) != 1:
        return None
    stride = expected = None
    for d in range(x.dim() - 2, -1, -1):
        if x.shape[d] == 1:
            continue
        if stride is None:
            stride = x.stride(d)
        elif x.stride(d) != expected:
            return None
        expected = x.stride(d) * x.shape[d]
    return stride if stride is not None else x.shape[-1]


@custom_op("transmamba::swiglu")
def _swiglu_op(x: Tensor) -> Tensor:
    F = x.shape[-1] // 2
    rows = x.numel() // x.shape[-1]
    out = torch.empty(*x.shape[:-1], F, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(rows, _BLOCK_R), triton.cdiv(F, _BLOCK_F))
    _swiglu_fwd_kernel[grid](x, out, rows, F, _row_stride(x), BLOCK_R=_BLOCK_R, BLOCK_F=_BLOCK_F)
    return out


@custom_op("transmamba::swiglu_backward")
def _swiglu_backward_op(dout: Tensor, x: Tensor) -> Tensor:
    F = x.shape[-1] // 2
    rows = x.numel() // x.shape[-1]
    if _row_stride(dout) is None:
        dout = dout.contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(rows, _BLOCK_R), triton.cdiv(F, _BLOCK_F))
    _swiglu_bwd_kernel[grid](x, dout, dx, rows, F, _row_stride(x), _row_stride(dout), BLOCK_R=_BLOCK_R,
                             BLOCK_F=_BLOCK_F)
    return dx


@_swiglu_op.register_fake
def _(x):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@_swiglu_backward_op.register_fake
def _(dout, x):
    return x.new_empty(x.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dout):
    (x,) = ctx.saved_tensors
    return _swiglu_backward_op(dout, x)


_swiglu_op.register_autograd(_backward, setup_context=_setup)


def swiglu_triton(x: Tensor) -> Tensor:
    """Fused ``swiglu_naive``: x [..., 2F] (fc1's output; rows evenly spaced with a unit last
    stride, else copied) -> SiLU(x[..., :F]) * x[..., F:] as [..., F] contiguous in x's dtype.
    Forward 1 kernel, backward 1 (dx [..., 2F])."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu_triton: the last dim must be even (2F), got {x.shape[-1]}")
    if x.dtype == torch.float64:
        raise TypeError("swiglu_triton: float64 is not supported (use swiglu_naive)")
    if _row_stride(x) is None:
        x = x.contiguous()
    return _swiglu_op(x)
