"""Fused RMSNorm and residual-add + RMSNorm over the last dim (Triton), forward and backward.

Same functions as ``naive.rmsnorm_naive`` / ``naive.add_rmsnorm_naive``: y = x / sqrt(mean(x^2)
+ eps) * w in float32. The forward is one kernel: it reads x (and the residual), writes the
normed rows (and the sum) and one float32 1/rms per row. The backward is two kernels: one
recomputes the normalised rows and writes dx plus one float32 weight-gradient partial per
program; ``_sum_partials_kernel`` adds the partials in a fixed order into the weight's dtype
(no atomics, so the weight gradient is the same bits on every run). Each public op is a
``torch.library.custom_op`` (namespace ``transmamba``) with a fake and an autograd formula, so
``torch.compile(fullgraph=True)`` traces through it.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..custom_op import custom_op

__all__ = ["add_rmsnorm_triton", "rmsnorm_triton"]


@triton.jit
def _add_rmsnorm_fwd_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, rstd_ptr, rows, C, eps,
                            rows_per_program, BLOCK_C: tl.constexpr, HAS_RES: tl.constexpr):
    c = tl.arange(0, BLOCK_C)
    mask = c < C
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    for i in range(rows_per_program):
        row = tl.program_id(0) * rows_per_program + i
        if row < rows:
            h = tl.load(x_ptr + row * C + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                h += tl.load(res_ptr + row * C + c, mask=mask, other=0.0).to(tl.float32)
                # the norm reads the sum as stored (in the residual's dtype), as unfused code does
                h_stored = h.to(sum_ptr.dtype.element_ty)
                tl.store(sum_ptr + row * C + c, h_stored, mask=mask)
                h = h_stored.to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / C + eps)
            tl.store(out_ptr + row * C + c, (h * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(rstd_ptr + row, rstd)


@triton.jit
def _add_rmsnorm_bwd_kernel(h_ptr, w_ptr, rstd_ptr, dout_ptr, dsum_ptr, dh_ptr, dw_ptr, rows, C,
                            rows_per_program, BLOCK_C: tl.constexpr, HAS_DSUM: tl.constexpr):
    """dh = d(normed)/dh + d_summed for rows_per_program rows; one weight-gradient partial."""
    c = tl.arange(0, BLOCK_C)
    mask = c < C
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(rows_per_program):
        row = tl.program_id(0) * rows_per_program + i
        if row < rows:
            xhat = tl.load(h_ptr + row * C + c, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            xhat = xhat * rstd
            dout = tl.load(dout_ptr + row * C + c, mask=mask, other=0.0).to(tl.float32)
            dw += dout * xhat
            dxhat = dout * w
            dh = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=0) / C))
            if HAS_DSUM:
                dh += tl.load(dsum_ptr + row * C + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(dh_ptr + row * C + c, dh.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + tl.program_id(0) * C + c, dw, mask=mask)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, n, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[c] = sum_i part[i, c] over float32 partials [n, C], in a fixed order."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    i = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        acc += tl.load(part_ptr + (start + i)[:, None] * C + c[None, :],
                       mask=((start + i) < n)[:, None] & (c < C)[None, :], other=0.0)
    tl.store(out_ptr + c, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=c < C)


_ROWS_FWD = 16          # rows per forward program
_ROWS_BWD = 16          # at least this many rows per backward program ...
_MAX_PARTIALS = 1024    # ... and at most this many weight-gradient partials


def backward_rows_per_program(rows: int) -> int:
    """Rows per backward program: few enough programs that the partials stay small."""
    return max(_ROWS_BWD, triton.cdiv(rows, _MAX_PARTIALS))


def sum_partials(partials: Tensor, out: Tensor) -> Tensor:
    """out [C] (any float dtype) = partials [n, C] float32 summed over n, deterministically."""
    n, C = partials.shape
    _sum_partials_kernel[(triton.cdiv(C, 128),)](partials, out, n, C, BLOCK_N=16, BLOCK_C=128)
    return out


def _forward(x: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float):
    C = x.shape[-1]
    rows = x.numel() // C
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = (torch.empty(x.shape, dtype=residual.dtype, device=x.device)
              if residual is not None else out)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    _add_rmsnorm_fwd_kernel[(triton.cdiv(rows, _ROWS_FWD),)](
        x, residual if residual is not None else x, weight, out, summed, rstd, rows, C, eps,
        _ROWS_FWD, BLOCK_C=triton.next_power_of_2(C), HAS_RES=residual is not None)
    return out, summed, rstd


@custom_op("transmamba::rmsnorm")
def _rmsnorm_op(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    out, _, rstd = _forward(x, None, weight, eps)
    return out, rstd


@custom_op("transmamba::add_rmsnorm")
def _add_rmsnorm_op(x: Tensor, residual: Tensor, weight: Tensor,
                    eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(x, residual, weight, eps)


@custom_op("transmamba::add_rmsnorm_backward")
def _add_rmsnorm_backward_op(d_normed: Tensor, d_summed: Optional[Tensor], summed: Tensor,
                             weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """-> (d summed [..., C] in summed's dtype, d weight [C] in weight's dtype)."""
    C = summed.shape[-1]
    rows = summed.numel() // C
    d_normed = d_normed.contiguous()
    d_summed = d_summed.contiguous() if d_summed is not None else None
    dh = torch.empty(summed.shape, dtype=summed.dtype, device=summed.device)
    per_program = backward_rows_per_program(rows)
    programs = triton.cdiv(rows, per_program)
    partials = torch.empty(programs, C, dtype=torch.float32, device=summed.device)
    _add_rmsnorm_bwd_kernel[(programs,)](
        summed, weight, rstd, d_normed, d_summed if d_summed is not None else d_normed, dh,
        partials, rows, C, per_program, BLOCK_C=triton.next_power_of_2(C),
        HAS_DSUM=d_summed is not None)
    dweight = sum_partials(partials, torch.empty(C, dtype=weight.dtype, device=weight.device))
    return dh, dweight


@_rmsnorm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x), x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@_add_rmsnorm_op.register_fake
def _(x, residual, weight, eps):
    return (torch.empty_like(x), torch.empty_like(residual),
            x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32))


@_add_rmsnorm_backward_op.register_fake
def _(d_normed, d_summed, summed, weight, rstd):
    return torch.empty_like(summed), torch.empty_like(weight)


def _rmsnorm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.mark_non_differentiable(output[1])      # rstd
    ctx.set_materialize_grads(False)            # and no zero gradient made for it
    ctx.save_for_backward(x, weight, output[1])


def _rmsnorm_backward(ctx, d_out, d_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = _add_rmsnorm_backward_op(d_out, None, x, weight, rstd)
    return dx, dweight, None


def _add_rmsnorm_setup(ctx, inputs, output):
    x, _, weight, _ = inputs
    ctx.x_dtype = x.dtype
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1], weight, output[2])


def _add_rmsnorm_backward(ctx, d_normed, d_summed, d_rstd):
    summed, weight, rstd = ctx.saved_tensors
    if d_normed is None:                        # only the sum was used
        return d_summed.to(ctx.x_dtype), d_summed, None, None
    dh, dweight = _add_rmsnorm_backward_op(d_normed, d_summed, summed, weight, rstd)
    # x and the residual get the same gradient; a cast only when their dtypes differ
    return dh.to(ctx.x_dtype), dh, dweight, None


_rmsnorm_op.register_autograd(_rmsnorm_backward, setup_context=_rmsnorm_setup)
_add_rmsnorm_op.register_autograd(_add_rmsnorm_backward, setup_context=_add_rmsnorm_setup)


def _check(x: Tensor, weight: Tensor, name: str) -> None:
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"{name}: weight must be [C] = [{x.shape[-1]}], got {tuple(weight.shape)}")
    if x.dtype == torch.float64:
        raise TypeError(f"{name}: float64 is not supported (use the naive op)")


def rmsnorm_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Fused ``rmsnorm_naive``: x [..., C] (any leading dims, e.g. megatron's [S, B, d]; copied
    if not contiguous), weight [C] (bf16 or fp32; its gradient in its dtype) -> [..., C] in x's
    dtype, float32 math. Forward 1 kernel, backward 2."""
    _check(x, weight, "rmsnorm_triton")
    return _rmsnorm_op(x.contiguous(), weight, float(eps))[0]


def add_rmsnorm_triton(x: Tensor, residual: Optional[Tensor], weight: Tensor,
                       eps: float) -> tuple[Tensor, Tensor]:
    """Fused ``add_rmsnorm_naive``: x, residual [..., C] contiguous (residual may be None),
    weight [C] -> (normed [..., C] in x's dtype, summed = x + residual in residual's dtype).
    Forward 1 kernel, backward 2; the backward gives x and the residual one gradient,
    d_summed + RMSNorm'(d_normed). Without a residual it is ``(rmsnorm_triton(x), x)``."""
    _check(x, weight, "add_rmsnorm_triton")
    if residual is None:
        return rmsnorm_triton(x, weight, eps), x
    if residual.shape != x.shape:
        raise ValueError(f"add_rmsnorm_triton: residual {tuple(residual.shape)} != x "
                         f"{tuple(x.shape)}")
    normed, summed, _ = _add_rmsnorm_op(x.contiguous(), residual.contiguous(), weight, float(eps))
    return normed, summed
