"""Fused grouped RMSNorm gated by SiLU(z) after the TransPoint, forward and backward (Triton).

Same function as ``naive.gated_rmsnorm_naive``: one program normalises a [rows, groups] tile (the
older kernel: a run of tokens of one group), reading y and z once and writing the output once (the
PyTorch version makes about eight float32 passes). y and z are read in place through their strides
(z is a column slice of the in-projection output), and the attention rows t < p may come from their
own tensor (``y_prefix``, the transposed grouped-attention output), so the mixer needs no copy to
splice them into the SSD output. A token is gated when its position (t, or with packed documents
``position_ids[b, t]``, the ``HAS_POS`` specialisation) is at or after the TransPoint. The backward
recomputes the gated input, writes dy, dz (and the prefix gradient) and one float32 weight-gradient
partial per program, which ``_sum_rows_kernel`` (the older kernel: ``rmsnorm.sum_partials``) adds
in a fixed order: forward 1 kernel,
backward 2. The op is a ``torch.library.custom_op`` for ``torch.compile``.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..custom_op import custom_op
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


@triton.jit
def _load_tile(y_ptr, z_ptr, pre_ptr, pos_ptr, row, g, c, valid, mask, T, GS, transpoint, prefix_len,
               sy_b, sy_t, sz_b, sz_t, sp_b, sp_t, sp_g, HAS_POS: tl.constexpr,
               HAS_PREFIX: tl.constexpr):
    """Units (row, group) of a tile: y (or the prefix) and z [units, BLOCK_C] in float32 (z is
    zero where the token is not gated), whether each is gated and whether it is a prefix row."""
    b = row // T
    t = row % T
    is_pre = t < prefix_len
    cols = c[None, :]
    if HAS_PREFIX:
        y = tl.load(y_ptr + (b * sy_b + t * sy_t + g * GS)[:, None] + cols,
                    mask=mask & ~is_pre[:, None], other=0.0).to(tl.float32)
        y += tl.load(pre_ptr + (b * sp_b + t * sp_t + g * sp_g)[:, None] + cols,
                     mask=mask & is_pre[:, None], other=0.0).to(tl.float32)
    else:
        y = tl.load(y_ptr + (b * sy_b + t * sy_t + g * GS)[:, None] + cols, mask=mask,
                    other=0.0).to(tl.float32)
    if HAS_POS:
        gated = tl.load(pos_ptr + row, mask=valid, other=0) >= transpoint
    else:
        gated = t >= transpoint
    z = tl.load(z_ptr + (b * sz_b + t * sz_t + g * GS)[:, None] + cols,
                mask=mask & gated[:, None], other=0.0).to(tl.float32)
    return y, z, gated, is_pre


@triton.jit
def _gated_rmsnorm_fwd_tile_kernel(y_ptr, z_ptr, pre_ptr, w_ptr, pos_ptr, out_ptr, rstd_ptr, rows,
                                   T, G, GS, eps, transpoint, prefix_len, sy_b, sy_t, sz_b, sz_t,
                                   sp_b, sp_t, sp_g, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
                                   BLOCK_C: tl.constexpr, HAS_POS: tl.constexpr,
                                   HAS_PREFIX: tl.constexpr):
    """One program: BLOCK_R rows x BLOCK_G groups as one [units, BLOCK_C] tile, loaded at once;
    each unit's sum of squares stays inside a warp."""
    i = tl.arange(0, BLOCK_R * BLOCK_G)
    row = tl.program_id(0) * BLOCK_R + i // BLOCK_G
    g = tl.program_id(1) * BLOCK_G + i % BLOCK_G
    c = tl.arange(0, BLOCK_C)
    valid = (row < rows) & (g < G)
    mask = valid[:, None] & (c < GS)[None, :]
    h, z, gated, _ = _load_tile(y_ptr, z_ptr, pre_ptr, pos_ptr, row, g, c, valid, mask, T, GS,
                                transpoint, prefix_len, sy_b, sy_t, sz_b, sz_t, sp_b, sp_t, sp_g,
                                HAS_POS, HAS_PREFIX)
    h = tl.where(gated[:, None], h * z * tl.sigmoid(z), h)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / GS + eps)
    w = tl.load(w_ptr + (g * GS)[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + ((row * G + g) * GS)[:, None] + c[None, :],
             (h * rstd[:, None] * w).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row * G + g, rstd, mask=valid)


@triton.jit
def _gated_rmsnorm_bwd_tile_kernel(y_ptr, z_ptr, pre_ptr, w_ptr, pos_ptr, rstd_ptr, dout_ptr,
                                   dy_ptr, dz_ptr, dpre_ptr, dw_ptr, rows, T, G, GS, transpoint,
                                   prefix_len, rows_per_program, sy_b, sy_t, sz_b, sz_t, sp_b,
                                   sp_t, sp_g, sd_b, sd_t, BLOCK_R: tl.constexpr,
                                   BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
                                   HAS_POS: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """rows_per_program rows (a multiple of BLOCK_R) x BLOCK_G groups, BLOCK_R rows a step. The
    weight-gradient terms add up per unit slot in registers (slot i is always group i %
    BLOCK_G) and are summed over the slots once, into the program's partial row of [C]."""
    i = tl.arange(0, BLOCK_R * BLOCK_G)
    g = tl.program_id(1) * BLOCK_G + i % BLOCK_G
    c = tl.arange(0, BLOCK_C)
    w = tl.load(w_ptr + (g * GS)[:, None] + c[None, :], mask=(g < G)[:, None] & (c < GS)[None, :],
                other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_R * BLOCK_G, BLOCK_C], dtype=tl.float32)
    first = tl.program_id(0) * rows_per_program
    for r0 in range(first, tl.minimum(first + rows_per_program, rows), BLOCK_R):
        row = r0 + i // BLOCK_G
        valid = (row < rows) & (g < G)
        mask = valid[:, None] & (c < GS)[None, :]
        y, z, gated, is_pre = _load_tile(y_ptr, z_ptr, pre_ptr, pos_ptr, row, g, c, valid, mask, T, GS,
                                         transpoint, prefix_len, sy_b, sy_t, sz_b, sz_t, sp_b,
                                         sp_t, sp_g, HAS_POS, HAS_PREFIX)
        b = row // T
        t = row % T
        dout = tl.load(dout_ptr + (b * sd_b + t * sd_t + g * GS)[:, None] + c[None, :], mask=mask,
                       other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row * G + g, mask=valid, other=0.0)
        sig = tl.sigmoid(z)
        gate = gated[:, None]
        xhat = tl.where(gate, y * z * sig, y) * rstd[:, None]
        dw += dout * xhat
        dxhat = dout * w
        dh = rstd[:, None] * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=1) / GS)[:, None])
        dy = tl.where(gate, dh * z * sig, dh)
        dz = tl.where(gate, dh * y * sig * (1.0 + z * (1.0 - sig)), 0.0)
        out_off = ((row * G + g) * GS)[:, None] + c[None, :]
        tl.store(dz_ptr + out_off, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if HAS_PREFIX:
            tl.store(dpre_ptr + (((b * prefix_len + t) * G + g) * GS)[:, None] + c[None, :],
                     dy.to(dpre_ptr.dtype.element_ty), mask=mask & is_pre[:, None])
            dy = tl.where(is_pre[:, None], 0.0, dy)
        tl.store(dy_ptr + out_off, dy.to(dy_ptr.dtype.element_ty), mask=mask)
    dw_g = tl.sum(tl.reshape(dw, [BLOCK_R, BLOCK_G, BLOCK_C]), axis=0)
    gg = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    tl.store(dw_ptr + tl.program_id(0) * G * GS + (gg * GS)[:, None] + c[None, :], dw_g,
             mask=(gg < G)[:, None] & (c < GS)[None, :])


@triton.jit
def _sum_rows_kernel(part_ptr, out_ptr, n, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[k] = sum_i part[i, k] over float32 partials [n, K] in a fixed order, BLOCK_N rows a
    step (one step for the tile backward's few partials)."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    i = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        acc += tl.load(part_ptr + (start + i)[:, None] * K + k[None, :],
                       mask=((start + i) < n)[:, None] & (k < K)[None, :], other=0.0)
    tl.store(out_ptr + k, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=k < K)


_ROWS_FWD = 16

# Kernel variants (tools/bench/bench_fused_ops.py --shapes training times each; docs/kernels.md
# has their predicted times). "rows": one program per group and 16 rows, one row at a time.
# The tile kernels take [rows, groups] blocks of about ``tile`` (forward) / ``bwd_tile`` elements
# at once (16 per thread in the backward: 32 spill at sm_90), fwd_block_g / bwd_block_g groups
# wide; the backward walks rows_per_program rows so the grid has about
# programs_per_sm programs per SM with at most max_partials weight-gradient partials.
# Selected by TRANSMAMBA_GATED_NORM, or by assigning ``_NORM``.
NORM_VARIANTS = {
    "rows": dict(kernel="rows"),
    "tile": dict(kernel="tile", fwd_block_g=16, bwd_block_g=2, tile=4096, bwd_tile=2048,
                 num_warps=4, programs_per_sm=8, max_partials=128),
    "tile-g1": dict(kernel="tile", fwd_block_g=16, bwd_block_g=1, tile=4096, bwd_tile=2048,
                    num_warps=4, programs_per_sm=8, max_partials=64),
    "tile-g4": dict(kernel="tile", fwd_block_g=4, bwd_block_g=4, tile=4096, bwd_tile=2048,
                    num_warps=4, programs_per_sm=8, max_partials=256),
    "tile-8w": dict(kernel="tile", fwd_block_g=16, bwd_block_g=2, tile=8192, bwd_tile=4096,
                    num_warps=8, programs_per_sm=4, max_partials=128),
    # the tile forward with the rows backward: the fastest of each on one H200 (2026-12-02,
    # training shape: forward 0.044 ms tile vs 0.098 rows, backward 0.154 rows vs 0.238 tile)
    "tile+rows": dict(kernel="tile", bwd_kernel="rows", fwd_block_g=16, tile=4096, num_warps=4),
}


def _env_choice(name: str, variants: dict, default: str) -> dict:
    choice = os.environ.get(name, default)
    if choice not in variants:
        raise ValueError(f"{name}={choice!r}: not one of {sorted(variants)}")
    return dict(variants[choice])


_NORM = _env_choice("TRANSMAMBA_GATED_NORM", NORM_VARIANTS, "tile+rows")


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132                  # an H100 / H200, for CPU runs and the compile check


def _tile_shape(groups: int, gs: int, block_g: int, tile: int) -> tuple[int, int]:
    """(rows, groups) of a tile: up to block_g groups, then rows up to ``tile`` elements."""
    block_g = min(block_g, triton.next_power_of_2(groups))
    return max(1, tile // (block_g * triton.next_power_of_2(gs))), block_g


def _prefix_args(y: Tensor, y_prefix: Optional[Tensor]):
    if y_prefix is None:
        return y, 0, (0, 0, 0)
    return y_prefix, y_prefix.shape[1], y_prefix.stride()[:3]


@custom_op("transmamba::gated_rmsnorm")
def _gated_rmsnorm_op(y: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float,
                      transpoint: int, position_ids: Optional[Tensor],
                      y_prefix: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    batch, T, width = y.shape
    rows, gs = batch * T, width // groups
    out = torch.empty(batch, T, width, dtype=y.dtype, device=y.device)
    rstd = torch.empty(rows, groups, dtype=torch.float32, device=y.device)
    prefix, prefix_len, sp = _prefix_args(y, y_prefix)
    args = (y, z, prefix, weight, position_ids if position_ids is not None else rstd, out, rstd,
             rows, T, groups, gs, eps, transpoint, prefix_len)
    flags = dict(BLOCK_C=triton.next_power_of_2(gs), HAS_POS=position_ids is not None,
                 HAS_PREFIX=y_prefix is not None)
    strides = (y.stride(0), y.stride(1), z.stride(0), z.stride(1), *sp)
    cfg = _NORM
    if cfg["kernel"] == "rows":
        _gated_rmsnorm_fwd_kernel[(triton.cdiv(rows, _ROWS_FWD), groups)](
            *args, _ROWS_FWD, *strides, **flags)
    else:
        block_r, block_g = _tile_shape(groups, gs, cfg["fwd_block_g"], cfg["tile"])
        _gated_rmsnorm_fwd_tile_kernel[(triton.cdiv(rows, block_r), triton.cdiv(groups, block_g))](
            *args, *strides, BLOCK_R=block_r, BLOCK_G=block_g, num_warps=cfg["num_warps"], **flags)
    return out, rstd


@custom_op("transmamba::gated_rmsnorm_backward")
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
    args = (y, z, prefix, weight, position_ids if position_ids is not None else rstd, rstd, dout,
            dy, dz, dprefix if y_prefix is not None else dy)
    strides = (y.stride(0), y.stride(1), z.stride(0), z.stride(1), *sp, dout.stride(0),
               dout.stride(1))
    flags = dict(BLOCK_C=triton.next_power_of_2(gs), HAS_POS=position_ids is not None,
                 HAS_PREFIX=y_prefix is not None)
    dweight = torch.empty(width, dtype=weight.dtype, device=y.device)
    cfg = _NORM
    if cfg.get("bwd_kernel", cfg["kernel"]) == "rows":
        per_program = backward_rows_per_program(rows)
        programs = triton.cdiv(rows, per_program)
        partials = torch.empty(programs, width, dtype=torch.float32, device=y.device)
        _gated_rmsnorm_bwd_kernel[(programs, groups)](
            *args, partials, rows, T, groups, gs, transpoint, prefix_len, per_program, *strides,
            **flags)
        return dy, dz, sum_partials(partials, dweight), dprefix
    block_r, block_g = _tile_shape(groups, gs, cfg["bwd_block_g"], cfg["bwd_tile"])
    group_blocks = triton.cdiv(groups, block_g)
    # about programs_per_sm programs per SM, at most max_partials weight-gradient partials
    row_programs = min(cfg["max_partials"], max(1, cfg["programs_per_sm"] * _num_sms(y.device)
                                                // group_blocks))
    per_program = triton.cdiv(triton.cdiv(rows, row_programs), block_r) * block_r
    programs = triton.cdiv(rows, per_program)
    partials = torch.empty(programs, width, dtype=torch.float32, device=y.device)
    _gated_rmsnorm_bwd_tile_kernel[(programs, group_blocks)](
        *args, partials, rows, T, groups, gs, transpoint, prefix_len, per_program, *strides,
        BLOCK_R=block_r, BLOCK_G=block_g, num_warps=cfg["num_warps"], **flags)
    block_n = min(128, triton.next_power_of_2(programs))
    _sum_rows_kernel[(triton.cdiv(width, 32),)](partials, dweight, programs, width,
                                                BLOCK_N=block_n, BLOCK_K=32)
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
    dy, dz, dweight, dprefix = _gated_rmsnorm_backward_op(
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
    out, _ = _gated_rmsnorm_op(y, z, weight.contiguous(), int(groups), float(eps),
                               max(0, int(transpoint)), position_ids, y_prefix)
    return out
