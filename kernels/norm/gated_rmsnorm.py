"""Fused grouped RMSNorm gated by SiLU(z) after the TransPoint, forward and backward (Triton).

Same function as ``naive.gated_rmsnorm_naive``: one program normalises a run of tokens of one
group, reading y and z once and writing the output once (the PyTorch version makes about eight
float32 passes). y and z are read in place through their strides (z is a column slice of the
in-projection output), and the attention rows t < p may come from their own tensor
(``y_prefix``, the transposed grouped-attention output), so the mixer needs no copy to splice
them into the SSD output. A token is gated when its position (t, or with packed documents
``position_ids[b, t]``, the ``HAS_POS`` specialisation) is at or after the TransPoint. The
backward recomputes the gated input, writes dy, dz (and the prefix gradient) and one float32
weight-gradient partial per program, which ``rmsnorm.sum_partials`` adds in a fixed order:
forward 1 kernel, backward 2. The op is a ``torch.library.custom_op`` for ``torch.compile``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .rmsnorm import backward_rows_per_program, rmsnorm_triton, sum_partials

__all__ = ["gated_rmsnorm_triton", "rmsnorm_triton"]


@triton.jit
def _load_h(y_ptr, pre_ptr, row, g, c, mask_c, T, GS, prefix_len, sy_b, sy_t, sp_b, sp_t, sp_g,
            HAS_PREFIX: tl.constexpr):
    """Row ``row`` = (b, t) of group g of the normalised input, before the gate, in float32."""
    b = row // T
    t = row % T
    if HAS_PREFIX:
        if t < prefix_len:
            y = tl.load(pre_ptr + b * sp_b + t * sp_t + g * sp_g + c, mask=mask_c, other=0.0)
        else:
            y = tl.load(y_ptr + b * sy_b + t * sy_t + g * GS + c, mask=mask_c, other=0.0)
    else:
        y = tl.load(y_ptr + b * sy_b + t * sy_t + g * GS + c, mask=mask_c, other=0.0)
    return y.to(tl.float32)


@triton.jit
def _gated_rmsnorm_fwd_kernel(y_ptr, z_ptr, pre_ptr, w_ptr, pos_ptr, out_ptr, rstd_ptr, rows, T,
                              G, GS, eps, transpoint, prefix_len, rows_per_program, sy_b, sy_t,
                              sz_b, sz_t, sp_b, sp_t, sp_g, BLOCK_C: tl.constexpr,
                              HAS_POS: tl.constexpr, HAS_PREFIX: tl.constexpr):
    pid_t, g = tl.program_id(0), tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    mask_c = c < GS
    w = tl.load(w_ptr + g * GS + c, mask=mask_c, other=0.0).to(tl.float32)
    for i in range(rows_per_program):
        row = pid_t * rows_per_program + i
        if row < rows:
            h = _load_h(y_ptr, pre_ptr, row, g, c, mask_c, T, GS, prefix_len, sy_b, sy_t, sp_b,
                        sp_t, sp_g, HAS_PREFIX)
            if HAS_POS:
                position = tl.load(pos_ptr + row)
            else:
                position = row % T
            if position >= transpoint:
                z = tl.load(z_ptr + (row // T) * sz_b + (row % T) * sz_t + g * GS + c,
                            mask=mask_c, other=0.0).to(tl.float32)
                h = h * z * tl.sigmoid(z)
            rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / GS + eps)
            tl.store(out_ptr + (row * G + g) * GS + c, (h * rstd * w).to(out_ptr.dtype.element_ty),
                     mask=mask_c)
            tl.store(rstd_ptr + row * G + g, rstd)


@triton.jit
def _gated_rmsnorm_bwd_kernel(y_ptr, z_ptr, pre_ptr, w_ptr, pos_ptr, rstd_ptr, dout_ptr, dy_ptr,
                              dz_ptr, dpre_ptr, dw_ptr, rows, T, G, GS, transpoint, prefix_len,
                              rows_per_program, sy_b, sy_t, sz_b, sz_t, sp_b, sp_t, sp_g, sd_b,
                              sd_t, BLOCK_C: tl.constexpr, HAS_POS: tl.constexpr,
                              HAS_PREFIX: tl.constexpr):
    """dy, dz [B, T, C] and dprefix [B, p, G, C/G] contiguous; rows t < p of dy are zero when
    they come from the prefix. One weight-gradient partial [C] per program along the rows."""
    pid_t, g = tl.program_id(0), tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    mask_c = c < GS
    w = tl.load(w_ptr + g * GS + c, mask=mask_c, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(rows_per_program):
        row = pid_t * rows_per_program + i
        if row < rows:
            b = row // T
            t = row % T
            off = (row * G + g) * GS + c
            y = _load_h(y_ptr, pre_ptr, row, g, c, mask_c, T, GS, prefix_len, sy_b, sy_t, sp_b,
                        sp_t, sp_g, HAS_PREFIX)
            dout = tl.load(dout_ptr + b * sd_b + t * sd_t + g * GS + c, mask=mask_c,
                           other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row * G + g)
            if HAS_POS:
                gated = tl.load(pos_ptr + row) >= transpoint
            else:
                gated = t >= transpoint
            z = tl.load(z_ptr + b * sz_b + t * sz_t + g * GS + c, mask=mask_c & gated,
                        other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            h = tl.where(gated, y * z * sig, y)
            xhat = h * rstd
            dw += dout * xhat
            dxhat = dout * w
            dh = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=0) / GS))
            dy = tl.where(gated, dh * z * sig, dh)
            dz = tl.where(gated, dh * y * sig * (1.0 + z * (1.0 - sig)), 0.0)
            tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=mask_c)
            if HAS_PREFIX:
                if t < prefix_len:
                    tl.store(dpre_ptr + ((b * prefix_len + t) * G + g) * GS + c,
                             dy.to(dpre_ptr.dtype.element_ty), mask=mask_c)
                    dy = tl.zeros([BLOCK_C], dtype=tl.float32)
            tl.store(dy_ptr + off, dy.to(dy_ptr.dtype.element_ty), mask=mask_c)
    tl.store(dw_ptr + (pid_t * G + g) * GS + c, dw, mask=mask_c)


_ROWS_FWD = 16


def _prefix_args(y: Tensor, y_prefix: Optional[Tensor]):
    if y_prefix is None:
        return y, 0, (0, 0, 0)
    return y_prefix, y_prefix.shape[1], y_prefix.stride()[:3]


@torch.library.custom_op("transmamba::gated_rmsnorm", mutates_args=())
def _gated_rmsnorm_op(y: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float,
                      transpoint: int, position_ids: Optional[Tensor],
                      y_prefix: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    batch, T, width = y.shape
    rows, gs = batch * T, width // groups
    out = torch.empty(batch, T, width, dtype=y.dtype, device=y.device)
    rstd = torch.empty(rows, groups, dtype=torch.float32, device=y.device)
    prefix, prefix_len, sp = _prefix_args(y, y_prefix)
    _gated_rmsnorm_fwd_kernel[(triton.cdiv(rows, _ROWS_FWD), groups)](
        y, z, prefix, weight, position_ids if position_ids is not None else rstd, out, rstd,
        rows, T, groups, gs, eps, transpoint, prefix_len, _ROWS_FWD, y.stride(0), y.stride(1),
        z.stride(0), z.stride(1), *sp, BLOCK_C=triton.next_power_of_2(gs),
        HAS_POS=position_ids is not None, HAS_PREFIX=y_prefix is not None)
    return out, rstd


@torch.library.custom_op("transmamba::gated_rmsnorm_backward", mutates_args=())
def _gated_rmsnorm_backward_op(dout: Tensor, y: Tensor, z: Tensor, weight: Tensor, rstd: Tensor,
                               groups: int, transpoint: int, position_ids: Optional[Tensor],
                               y_prefix: Optional[Tensor]
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> dy [B, T, C], dz [B, T, C], dweight [C], dprefix [B, p, G, C/G] (empty without a
    prefix), each in its input's dtype."""
    batch, T, width = y.shape
    rows, gs = batch * T, width // groups
    dy = torch.empty(batch, T, width, dtype=y.dtype, device=y.device)
    dz = torch.empty(batch, T, width, dtype=z.dtype, device=y.device)
    prefix, prefix_len, sp = _prefix_args(y, y_prefix)
    dprefix = torch.empty((batch, prefix_len, groups, gs) if y_prefix is not None else (0,),
                          dtype=prefix.dtype, device=y.device)
    per_program = backward_rows_per_program(rows)
    programs = triton.cdiv(rows, per_program)
    partials = torch.empty(programs, width, dtype=torch.float32, device=y.device)
    _gated_rmsnorm_bwd_kernel[(programs, groups)](
        y, z, prefix, weight, position_ids if position_ids is not None else rstd, rstd, dout, dy,
        dz, dprefix if y_prefix is not None else dy, partials, rows, T, groups, gs, transpoint,
        prefix_len, per_program, y.stride(0), y.stride(1), z.stride(0), z.stride(1), *sp,
        dout.stride(0), dout.stride(1), BLOCK_C=triton.next_power_of_2(gs),
        HAS_POS=position_ids is not None, HAS_PREFIX=y_prefix is not None)
    dweight = sum_partials(partials, torch.empty(width, dtype=weight.dtype, device=y.device))
    return dy, dz, dweight, dprefix


@_gated_rmsnorm_op.register_fake
def _(y, z, weight, groups, eps, transpoint, position_ids, y_prefix):
    return (y.new_empty(y.shape), y.new_empty(y.shape[0] * y.shape[1], groups,
                                              dtype=torch.float32))


@_gated_rmsnorm_backward_op.register_fake
def _(dout, y, z, weight, rstd, groups, transpoint, position_ids, y_prefix):
    dprefix = (y_prefix.new_empty(y_prefix.shape) if y_prefix is not None else y.new_empty(0))
    return y.new_empty(y.shape), z.new_empty(z.shape), torch.empty_like(weight), dprefix


def _setup(ctx, inputs, output):
    y, z, weight, groups, _, transpoint, position_ids, y_prefix = inputs
    ctx.groups, ctx.transpoint = groups, transpoint
    ctx.mark_non_differentiable(output[1])      # rstd
    ctx.set_materialize_grads(False)            # and no zero gradient made for it
    ctx.save_for_backward(y, z, weight, output[1], position_ids, y_prefix)


def _backward(ctx, dout, d_rstd):
    y, z, weight, rstd, position_ids, y_prefix = ctx.saved_tensors
    dy, dz, dweight, dprefix = torch.ops.transmamba.gated_rmsnorm_backward(
        dout, y, z, weight, rstd, ctx.groups, ctx.transpoint, position_ids, y_prefix)
    return dy, dz, dweight, None, None, None, None, (dprefix if y_prefix is not None else None)


_gated_rmsnorm_op.register_autograd(_backward, setup_context=_setup)


def gated_rmsnorm_triton(y: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float,
                         transpoint: int, position_ids: Optional[Tensor] = None,
                         y_prefix: Optional[Tensor] = None) -> Tensor:
    """Fused ``gated_rmsnorm_naive``: y, z [B, T, C] with any batch and token strides and a
    unit channel stride (read in place); weight [C] (bf16 or fp32); C % groups == 0;
    position_ids [B, T] integer position of each token in its document (packed documents), or
    None for 0..T-1. Tokens at positions >= transpoint are gated. y_prefix [B, p, G, C/G], any
    strides on its first three dims (``out.transpose(1, 2)`` of a grouped attention output
    [B, G, p, C/G]), unpacked only: rows t < p are read from it and y's are never read.
    Returns [B, T, C] contiguous in y's dtype; gradients in each input's dtype. Forward 1
    kernel, backward 2."""
    if y.shape != z.shape or y.dim() != 3:
        raise ValueError(f"y and z must both be [B, T, C], got {tuple(y.shape)} and {tuple(z.shape)}")
    if y.shape[-1] % groups or weight.shape != (y.shape[-1],):
        raise ValueError(f"weight must be [C] = [{y.shape[-1]}] with C divisible by groups={groups}, "
                         f"got {tuple(weight.shape)}")
    if y.dtype == torch.float64:
        raise TypeError("gated_rmsnorm_triton: float64 is not supported (use gated_rmsnorm_naive)")
    if y.stride(-1) != 1:
        y = y.contiguous()
    if z.stride(-1) != 1:
        z = z.contiguous()
    if position_ids is not None:
        if position_ids.shape != y.shape[:2] or position_ids.is_floating_point():
            raise ValueError(f"position_ids must be an integer [B, T] = {list(y.shape[:2])} "
                             f"tensor, got {position_ids.dtype} {tuple(position_ids.shape)}")
        position_ids = position_ids.contiguous()
    if y_prefix is not None:
        batch, T, width = y.shape
        p = y_prefix.shape[1]
        if position_ids is not None:
            raise ValueError("y_prefix is for the unpacked layout only (no position_ids)")
        if y_prefix.shape != (batch, p, groups, width // groups) or p > T:
            raise ValueError(f"y_prefix must be [B, p <= T, G, C/G] = [{batch}, p, {groups}, "
                             f"{width // groups}], got {tuple(y_prefix.shape)}")
        if y_prefix.stride(-1) != 1:
            y_prefix = y_prefix.contiguous()
    out, _ = torch.ops.transmamba.gated_rmsnorm(y, z, weight.contiguous(), int(groups), float(eps),
                                                max(0, int(transpoint)), position_ids, y_prefix)
    return out
