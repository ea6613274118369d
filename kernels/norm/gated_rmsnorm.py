"""Fused grouped RMSNorm gated by SiLU(z) after the TransPoint, forward and backward (Triton).

Same function as ``naive.gated_rmsnorm_naive``: one program normalises BLOCK_T tokens of one
group, reading y and z once and writing the output once (the PyTorch version makes about eight
float32 passes). The backward recomputes the gated input, returns dy and dz, and sums the
weight gradient per program; the partial sums are added in PyTorch. A token is gated when its
position (t, or with packed documents ``position_ids[b, t]``, the ``HAS_POS`` specialisation)
is at or after the TransPoint, so the packed path is the same single pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gated_rmsnorm_triton", "rmsnorm_triton"]


@triton.jit
def _gated_rmsnorm_fwd_kernel(y_ptr, z_ptr, w_ptr, pos_ptr, out_ptr, rstd_ptr, rows, T, G, GS, eps,
                              transpoint, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                              HAS_POS: tl.constexpr, HAS_Z: tl.constexpr):
    pid_t, g = tl.program_id(0), tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    mask_c = c < GS
    w = tl.load(w_ptr + g * GS + c, mask=mask_c, other=0.0).to(tl.float32)
    for i in range(BLOCK_T):
        row = pid_t * BLOCK_T + i
        if row < rows:
            off = (row * G + g) * GS + c
            y = tl.load(y_ptr + off, mask=mask_c, other=0.0).to(tl.float32)
            if HAS_Z:
                if HAS_POS:
                    position = tl.load(pos_ptr + row)
                else:
                    position = row % T
                if position >= transpoint:
                    z = tl.load(z_ptr + off, mask=mask_c, other=0.0).to(tl.float32)
                    y = y * z * tl.sigmoid(z)
            rstd = 1.0 / tl.sqrt(tl.sum(y * y, axis=0) / GS + eps)
            tl.store(out_ptr + off, (y * rstd * w).to(out_ptr.dtype.element_ty), mask=mask_c)
            tl.store(rstd_ptr + row * G + g, rstd)


@triton.jit
def _gated_rmsnorm_bwd_kernel(y_ptr, z_ptr, w_ptr, pos_ptr, rstd_ptr, dout_ptr, dy_ptr, dz_ptr,
                              dw_ptr, rows, T, G, GS, transpoint, BLOCK_T: tl.constexpr,
                              BLOCK_C: tl.constexpr, HAS_POS: tl.constexpr, HAS_Z: tl.constexpr):
    pid_t, g = tl.program_id(0), tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    mask_c = c < GS
    w = tl.load(w_ptr + g * GS + c, mask=mask_c, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(BLOCK_T):
        row = pid_t * BLOCK_T + i
        if row < rows:
            off = (row * G + g) * GS + c
            y = tl.load(y_ptr + off, mask=mask_c, other=0.0).to(tl.float32)
            dout = tl.load(dout_ptr + off, mask=mask_c, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row * G + g)
            if HAS_Z:
                if HAS_POS:
                    gated = tl.load(pos_ptr + row) >= transpoint
                else:
                    gated = row % T >= transpoint
                z = tl.load(z_ptr + off, mask=mask_c & gated, other=0.0).to(tl.float32)
                sig = tl.sigmoid(z)
                h = tl.where(gated, y * z * sig, y)
            else:
                h = y
            xhat = h * rstd
            dw += dout * xhat
            dxhat = dout * w
            dh = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=0) / GS))
            if HAS_Z:
                tl.store(dy_ptr + off, tl.where(gated, dh * z * sig, dh).to(dy_ptr.dtype.element_ty),
                         mask=mask_c)
                if gated:
                    dz = dh * y * sig * (1.0 + z * (1.0 - sig))
                    tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=mask_c)
                else:
                    tl.store(dz_ptr + off, tl.zeros([BLOCK_C], dtype=dz_ptr.dtype.element_ty),
                             mask=mask_c)
            else:
                tl.store(dy_ptr + off, dh.to(dy_ptr.dtype.element_ty), mask=mask_c)
    tl.store(dw_ptr + (pid_t * G + g) * GS + c, dw, mask=mask_c)


_BLOCK_T = 16


class _GatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, z, weight, groups, eps, transpoint, position_ids):
        batch, T, width = y.shape
        rows, gs = batch * T, width // groups
        out = torch.empty_like(y)
        rstd = torch.empty(rows, groups, dtype=torch.float32, device=y.device)
        grid = (triton.cdiv(rows, _BLOCK_T), groups)
        has_pos = position_ids is not None
        _gated_rmsnorm_fwd_kernel[grid](y, z if z is not None else y, weight,
                                        position_ids if has_pos else rstd, out, rstd,
                                        rows, T, groups, gs, eps, transpoint, BLOCK_T=_BLOCK_T,
                                        BLOCK_C=triton.next_power_of_2(gs), HAS_POS=has_pos,
                                        HAS_Z=z is not None)
        ctx.save_for_backward(y, z, weight, rstd, position_ids)
        ctx.groups, ctx.transpoint = groups, transpoint
        return out

    @staticmethod
    def backward(ctx, dout):
        y, z, weight, rstd, position_ids = ctx.saved_tensors
        batch, T, width = y.shape
        rows, groups = batch * T, ctx.groups
        gs = width // groups
        dy = torch.empty_like(y)
        dz = torch.empty_like(z) if z is not None else None
        blocks = triton.cdiv(rows, _BLOCK_T)
        dw = torch.empty(blocks, groups, gs, dtype=torch.float32, device=y.device)
        has_pos = position_ids is not None
        _gated_rmsnorm_bwd_kernel[(blocks, groups)](
            y, z if z is not None else y, weight, position_ids if has_pos else rstd, rstd,
            dout.contiguous(), dy, dz if dz is not None else dy, dw,
            rows, T, groups, gs, ctx.transpoint, BLOCK_T=_BLOCK_T,
            BLOCK_C=triton.next_power_of_2(gs), HAS_POS=has_pos, HAS_Z=z is not None)
        return dy, dz, dw.sum(0).reshape(width).to(weight.dtype), None, None, None, None


def gated_rmsnorm_triton(y, z, weight, groups: int, eps: float, transpoint: int,
                         position_ids=None):
    """Fused ``gated_rmsnorm_naive``: y, z [B, T, C]; weight [C]; C % groups == 0;
    position_ids [B, T] integer position of each token in its document (packed documents), or
    None for 0..T-1. Tokens at positions >= transpoint are gated."""
    if y.shape != z.shape or y.dim() != 3:
        raise ValueError(f"y and z must both be [B, T, C], got {tuple(y.shape)} and {tuple(z.shape)}")
    if y.shape[-1] % groups or weight.shape != (y.shape[-1],):
        raise ValueError(f"weight must be [C] = [{y.shape[-1]}] with C divisible by groups={groups}, "
                         f"got {tuple(weight.shape)}")
    if y.dtype == torch.float64:
        raise TypeError("gated_rmsnorm_triton: float64 is not supported (use gated_rmsnorm_naive)")
    if position_ids is not None:
        if position_ids.shape != y.shape[:2] or position_ids.is_floating_point():
            raise ValueError(f"position_ids must be an integer [B, T] = {list(y.shape[:2])} "
                             f"tensor, got {position_ids.dtype} {tuple(position_ids.shape)}")
        position_ids = position_ids.contiguous()
    return _GatedRMSNorm.apply(y.contiguous(), z.contiguous(), weight, int(groups), float(eps),
                               max(0, int(transpoint)), position_ids)


def rmsnorm_triton(x, weight, eps: float):
    """Fused plain RMSNorm over the last dim: x [..., C] (any leading dims, e.g. megatron's
    [S, B, d]), weight [C] -> x / sqrt(mean(x^2) + eps) * weight in x's dtype, computed in
    float32 (the ungated ``HAS_Z=False`` specialisation of the gated kernels: one read and one
    write forward, where PyTorch makes about eight passes and launches about twenty kernels
    forward and backward)."""
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"weight must be [C] = [{x.shape[-1]}], got {tuple(weight.shape)}")
    if x.dtype == torch.float64:
        raise TypeError("rmsnorm_triton: float64 is not supported (use the PyTorch RMSNorm)")
    rows = x.reshape(1, -1, x.shape[-1])
    out = _GatedRMSNorm.apply(rows.contiguous(), None, weight, 1, float(eps), 0, None)
    return out.view(x.shape)
