"""Fused causal depthwise conv1d + bias + SiLU over [B, T, C] (Triton), forward and backward.

Same function as ``naive.causal_conv1d_silu_naive`` without the channels-first copies: one
forward program reads a [BLOCK_T + W - 1, BLOCK_C] window of the input and writes its outputs.
The default backward (``_conv_bwd_rows_kernel``, W <= 4) walks a run of rows per program with
each thread owning its channels: it recomputes the pre-activation from a 3-row window of x in
registers, forms g = dout * SiLU'(pre), and gets the input gradient as the transposed
convolution of g (dx[s] = sum_k w[W-1-k] g[s+k]) from the 3-row window of g; the 2D-tile
backward (``_conv_bwd_kernel``, any W) does the same with row-shifted copies of a tile. The
weight and bias gradients are summed in registers over the program's rows and
written as one float32 partial per program, which ``_conv_bwd_reduce_kernel`` adds in a fixed
order (no atomics: the same bits on every run): forward 1 kernel, backward 2. With packed
documents (``seq_idx`` [B, T]) a tap whose token lies in another document than the output token
reads zero, forward and backward (the ``HAS_SEQ`` specialisation; without it the kernels are
unchanged). The op is a ``torch.library.custom_op`` (``transmamba::causal_conv1d_silu``) so
``torch.compile(fullgraph=True)`` traces through it.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..custom_op import custom_op

__all__ = ["causal_conv1d_silu_triton"]


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, seq_ptr, out_ptr, T, C, stride_b, stride_t,
                     W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                     HAS_SEQ: tl.constexpr):
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32) + tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_SEQ:
        doc_t = tl.load(seq_ptr + b * T + t, mask=t < T, other=-1)
    for j in tl.static_range(W):
        src = t - (W - 1) + j
        read = (src >= 0) & (src < T)
        if HAS_SEQ:
            read = read & (tl.load(seq_ptr + b * T + src, mask=read, other=-1) == doc_t)
        xv = tl.load(x_ptr + b * stride_b + src[:, None] * stride_t + c[None, :],
                     mask=read[:, None] & mask_c[None, :], other=0.0)
        wj = tl.load(w_ptr + c * W + j, mask=mask_c, other=0.0).to(tl.float32)
        acc += xv.to(tl.float32) * wj[None, :]
    out = acc * tl.sigmoid(acc)
    tl.store(out_ptr + (b * T + t[:, None]) * C + c[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(t[:, None] < T) & mask_c[None, :])


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, seq_ptr, dout_ptr, dx_ptr, part_ptr, T, C,
                     stride_b, stride_t, sd_b, sd_t, num_tiles, tiles_per_program, W: tl.constexpr,
                     W_POW2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                     HAS_SEQ: tl.constexpr, GATHER_X: tl.constexpr):
    """One program: a BLOCK_C channel slice of tiles_per_program consecutive row tiles.

    A tile holds rows u = s0 - (W-1) + r, r < BLOCK_T, and owns the STEP = BLOCK_T - 2(W-1)
    positions s0 .. s0 + STEP - 1 (rows r = W-1 .. W-2+STEP): their dx, and the dweight / dbias
    terms of the outputs there. g = dout * SiLU'(pre) is needed on rows W-1 .. BLOCK_T-1
    (the owned ones and the W-1 after them), pre on the same rows from the W-1 rows before.
    Row shifts of the loaded tiles are register gathers (``tl.gather``), so x and dout are read
    once per tile (plus the 2(W-1) overlap rows with the neighbouring tiles); with
    ``GATHER_X=False`` the x shifts are shifted loads instead (L1 hits, as in the forward).
    With ``seq_idx`` a pair (output t, input s) contributes only inside one document.
    """
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    STEP: tl.constexpr = BLOCK_T - 2 * (W - 1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    r = tl.arange(0, BLOCK_T)
    taps = tl.arange(0, W_POW2)
    bias = tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    zero_idx = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.int32)
    own = (r >= W - 1) & (r < W - 1 + STEP)
    dw = tl.zeros([W_POW2, BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    first = pid_t * tiles_per_program
    for tile in range(first, tl.minimum(first + tiles_per_program, num_tiles)):
        u = tile * STEP - (W - 1) + r
        in_seq = (u >= 0) & (u < T)
        mask = in_seq[:, None] & mask_c[None, :]
        x_tile = tl.load(x_ptr + b * stride_b + u[:, None] * stride_t + c[None, :], mask=mask,
                         other=0.0)
        dout = tl.load(dout_ptr + b * sd_b + u[:, None] * sd_t + c[None, :],
                       mask=mask & (r >= W - 1)[:, None], other=0.0)
        if HAS_SEQ:
            doc = tl.load(seq_ptr + b * T + u, mask=in_seq, other=-1)
        # pre-activation of every row from W-1 on: tap j reads the row W-1-j earlier
        pre = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32) + bias[None, :]
        for j in tl.static_range(W):
            back = W - 1 - j  # a constexpr: j is (static_range); annotating it would be a reassignment
            if back == 0:
                xs = x_tile.to(tl.float32)
            else:
                src = u - back
                if GATHER_X:
                    xs = tl.gather(x_tile, tl.maximum(r - back, 0)[:, None] + zero_idx, 0)
                else:
                    xs = tl.load(x_ptr + b * stride_b + src[:, None] * stride_t + c[None, :],
                                 mask=((src >= 0) & (src < T))[:, None] & mask_c[None, :],
                                 other=0.0)
                xs = xs.to(tl.float32)
                if HAS_SEQ:
                    doc_src = tl.load(seq_ptr + b * T + src, mask=(src >= 0) & (src < T), other=-1)
                    xs = tl.where((doc_src == doc)[:, None], xs, 0.0)
            wj = tl.load(w_ptr + c * W + j, mask=mask_c, other=0.0).to(tl.float32)
            pre += xs * wj[None, :]
        sig = tl.sigmoid(pre)
        g = dout.to(tl.float32) * sig * (1.0 + pre * (1.0 - sig))    # zero where dout was not read
        db += tl.sum(tl.where(own[:, None], g, 0.0), axis=0)
        x_f = x_tile.to(tl.float32)
        dx = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for k in tl.static_range(W):
            # output u + k reads input u through tap W-1-k: dx[u] += w[W-1-k] g[u+k], and
            # dweight[W-1-k] += g[u+k] x[u] when u + k is an owned output
            if k == 0:
                gk = g
            else:
                gk = tl.gather(g, tl.minimum(r + k, BLOCK_T - 1)[:, None] + zero_idx, 0)
                if HAS_SEQ:
                    doc_dst = tl.load(seq_ptr + b * T + u + k, mask=(u + k >= 0) & (u + k < T),
                                      other=-2)
                    gk = tl.where((doc_dst == doc)[:, None], gk, 0.0)
            wk = tl.load(w_ptr + c * W + (W - 1 - k), mask=mask_c, other=0.0).to(tl.float32)
            dx += gk * wk[None, :]
            dst_owned = (r + k >= W - 1) & (r + k < W - 1 + STEP)
            dw_k = tl.sum(tl.where(dst_owned[:, None], gk * x_f, 0.0), axis=0)
            dw += tl.where((taps == W - 1 - k)[:, None], dw_k[None, :], 0.0)
        tl.store(dx_ptr + (b * T + u[:, None]) * C + c[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=own[:, None] & mask)
    # this program's partial: W weight-gradient taps, then the bias gradient
    program = b * tl.num_programs(0) + pid_t
    tl.store(part_ptr + (program * (W + 1) + taps[:, None]) * C + c[None, :], dw,
             mask=(taps < W)[:, None] & mask_c[None, :])
    tl.store(part_ptr + (program * (W + 1) + W) * C + c, db, mask=mask_c)


@triton.jit
def _conv_bwd_load(x_ptr, dout_ptr, seq_ptr, b, t, c, mask_c, T, g_lo, g_hi, stride_b, stride_t,
                   sd_b, sd_t, HAS_SEQ: tl.constexpr):
    """Row t of x (zero outside [0, g_hi)), of dout (zero outside [g_lo, g_hi)) in float32, and
    its document (t itself without seq_idx: any value of the right type will do)."""
    xv = tl.load(x_ptr + b * stride_b + t * stride_t + c, mask=mask_c & (t >= 0) & (t < g_hi),
                 other=0.0)
    dv = tl.load(dout_ptr + b * sd_b + t * sd_t + c, mask=mask_c & (t >= g_lo) & (t < g_hi),
                 other=0.0)
    if HAS_SEQ:
        doc = tl.load(seq_ptr + b * T + t, mask=(t >= 0) & (t < T), other=-1)
    else:
        doc = t
    return xv.to(tl.float32), dv.to(tl.float32), doc


@triton.jit
def _conv_bwd_step(xt, dt, ct, t, win, acc, taps, bias, s0, own_end, dx_ptr, b, c, mask_c, T, C,
                   HAS_SEQ: tl.constexpr):
    """Input row t: its pre-activation and g from the window of the 3 rows before, its dweight
    and dbias terms when t < own_end, and dx of row t - 3 (complete once g[t] is known).
    Returns the window moved on by one row and the accumulators."""
    x3, x2, x1, g3, g2, g1, c3, c2, c1 = win
    w0, w1, w2, w3 = taps
    if HAS_SEQ:     # a pair (output, input) counts inside one document only
        a3 = tl.where(c3 == ct, x3, 0.0)
        a2 = tl.where(c2 == ct, x2, 0.0)
        a1 = tl.where(c1 == ct, x1, 0.0)
    else:
        a3, a2, a1 = x3, x2, x1
    pre = bias + w0 * a3 + w1 * a2 + w2 * a1 + w3 * xt
    sig = tl.sigmoid(pre)
    g = dt * sig * (1.0 + pre * (1.0 - sig))        # zero where dout was not read
    go = tl.where(t < own_end, g, 0.0)
    dw0, dw1, dw2, dw3, db = acc
    if HAS_SEQ:
        dx = (w3 * g3 + w2 * tl.where(c2 == c3, g2, 0.0) + w1 * tl.where(c1 == c3, g1, 0.0)
              + w0 * tl.where(ct == c3, g, 0.0))
    else:
        dx = w3 * g3 + w2 * g2 + w1 * g1 + w0 * g
    s = t - 3
    tl.store(dx_ptr + (b * T + s) * C + c, dx.to(dx_ptr.dtype.element_ty),
             mask=mask_c & (s >= s0) & (s < own_end))
    return ((x2, x1, xt, g2, g1, g, c2, c1, ct),
            (dw0 + go * a3, dw1 + go * a2, dw2 + go * a1, dw3 + go * xt, db + go))


@triton.jit
def _conv_bwd_rows_kernel(x_ptr, w_ptr, b_ptr, seq_ptr, dout_ptr, dx_ptr, part_ptr, T, C,
                          stride_b, stride_t, sd_b, sd_t, rows_per_program, W: tl.constexpr,
                          BLOCK_C: tl.constexpr, HAS_SEQ: tl.constexpr, PREFETCH: tl.constexpr):
    """One program: a BLOCK_C channel slice of rows_per_program consecutive positions, walked
    one row at a time (W <= 4, the weight padded in front to 4 taps).

    Each thread owns its channels for the whole walk, so nothing crosses threads: the window of
    the last 3 rows of x and g is a few registers, and the dweight / dbias sums over the
    program's rows stay per thread until its one float32 partial is stored. A row is read once
    (plus 3 halo rows of x before the program's rows and 3 of x and dout after). Rows go 4 per
    loop step, all 8 loads issued first; ``PREFETCH`` issues the next step's loads before this
    step's arithmetic (double buffering in registers).
    """
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    PAD: tl.constexpr = 4 - W
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    s0 = pid_t * rows_per_program
    own_end = tl.minimum(s0 + rows_per_program, T)
    g_hi = tl.minimum(own_end + 3, T)        # g (and x) are needed up to row own_end + 2
    zero = tl.zeros([BLOCK_C], dtype=tl.float32)
    w3 = tl.load(w_ptr + c * W + (3 - PAD), mask=mask_c, other=0.0).to(tl.float32)
    if PAD < 3:                               # padded tap j is weight tap j - PAD
        w2 = tl.load(w_ptr + c * W + (2 - PAD), mask=mask_c, other=0.0).to(tl.float32)
    else:
        w2 = zero
    if PAD < 2:
        w1 = tl.load(w_ptr + c * W + (1 - PAD), mask=mask_c, other=0.0).to(tl.float32)
    else:
        w1 = zero
    if PAD < 1:
        w0 = tl.load(w_ptr + c * W + (0 - PAD), mask=mask_c, other=0.0).to(tl.float32)
    else:
        w0 = zero
    taps = (w0, w1, w2, w3)
    bias = tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    # the 3 rows before s0: x only (dx of rows >= s0 reads g from s0 on)
    x3, _, c3 = _conv_bwd_load(x_ptr, dout_ptr, seq_ptr, b, s0 - 3, c, mask_c, T, s0, g_hi,
                               stride_b, stride_t, sd_b, sd_t, HAS_SEQ)
    x2, _, c2 = _conv_bwd_load(x_ptr, dout_ptr, seq_ptr, b, s0 - 2, c, mask_c, T, s0, g_hi,
                               stride_b, stride_t, sd_b, sd_t, HAS_SEQ)
    x1, _, c1 = _conv_bwd_load(x_ptr, dout_ptr, seq_ptr, b, s0 - 1, c, mask_c, T, s0, g_hi,
                               stride_b, stride_t, sd_b, sd_t, HAS_SEQ)
    g3, g2, g1 = zero, zero, zero
    dw0, dw1, dw2, dw3, db = zero, zero, zero, zero, zero
    if PREFETCH:
        xa, da, ca = _conv_bwd_load(x_ptr, dout_ptr, seq_ptr, b, s0, c, mask_c, T, s0, g_hi,
                                    stride_b, stride_t, sd_b, sd_t, HAS_SEQ)
        xb, dbb, cb = _conv_bwd_load(x_ptr, dout_ptr, seq_ptr, b, s0 + 1, c, mask_c, T, s0,
                                     g_hi, stride_b, stride_t, sd_b, sd_t, HAS_SEQ)
        xc, dc, cc = _conv_bwd_load(x_ptr, dout_ptr, seq_ptr, b, s0 + 2, c, mask_c, T, s0, g_hi,
                                    stride_b, stride_t, sd_b, sd_t, HAS_SEQ)
        xd, dd, cd = _conv_bwd_load(x_ptr, dout_ptr, seq_ptr, b, s0 + 3, c, mask_c, T, s0, g_hi,
                                    stride_b, stride_t, sd_b, sd_t, HAS_SEQ)
    for it in range((own_end + 3 - s0 + 3) // 4):      # rows s0 .. own_end + 2, 4 a step
        t = s0 + 4 * it
        if PREFETCH:
            ya, ea, fa, yb, eb, fb, yc, ec, fc, yd, ed, fd = xa, da, ca, xb, dbb, cb, xc, dc, cc, xd, dd, cd
            xa, da, ca = _conv_bwd_load(x_ptr, dout_ptr, seq_ptr, b, t + 4, c, mask_c, T, s0,
                                        g_hi, stride_b, stride_t, sd_b, sd_t, HAS_SEQ)
            xb, dbb, cb = _conv_bwd_load(x_ptr, dout_ptr, seq_ptr, b, t + 5, c, mask_c, T, s0,
                                         g_hi, stride_b, stride_t, sd_b, sd_t, HAS_SEQ)
            xc, dc, cc = _conv_bwd_load(x_ptr, dout_ptr, seq_ptr, b, t + 6, c, mask_c, T, s0,
                                        g_hi, stride_b, stride_t, sd_b, sd_t, HAS_SEQ)
            xd, dd, cd = _conv_bwd_load(x_ptr, dout_ptr, seq_ptr, b, t + 7, c, mask_c, T, s0,
                                        g_hi, stride_b, stride_t, sd_b, sd_t, HAS_SEQ)
        else:
            ya, ea, fa = _conv_bwd_load(x_ptr, dout_ptr, seq_ptr, b, t, c, mask_c, T, s0, g_hi,
                                        stride_b, stride_t, sd_b, sd_t, HAS_SEQ)
            yb, eb, fb = _conv_bwd_load(x_ptr, dout_ptr, seq_ptr, b, t + 1, c, mask_c, T, s0,
                                        g_hi, stride_b, stride_t, sd_b, sd_t, HAS_SEQ)
            yc, ec, fc = _conv_bwd_load(x_ptr, dout_ptr, seq_ptr, b, t + 2, c, mask_c, T, s0,
                                        g_hi, stride_b, stride_t, sd_b, sd_t, HAS_SEQ)
            yd, ed, fd = _conv_bwd_load(x_ptr, dout_ptr, seq_ptr, b, t + 3, c, mask_c, T, s0,
                                        g_hi, stride_b, stride_t, sd_b, sd_t, HAS_SEQ)
        win = (x3, x2, x1, g3, g2, g1, c3, c2, c1)
        acc = (dw0, dw1, dw2, dw3, db)
        win, acc = _conv_bwd_step(ya, ea, fa, t, win, acc, taps, bias, s0, own_end, dx_ptr, b, c,
                                  mask_c, T, C, HAS_SEQ)
        win, acc = _conv_bwd_step(yb, eb, fb, t + 1, win, acc, taps, bias, s0, own_end, dx_ptr,
                                  b, c, mask_c, T, C, HAS_SEQ)
        win, acc = _conv_bwd_step(yc, ec, fc, t + 2, win, acc, taps, bias, s0, own_end, dx_ptr,
                                  b, c, mask_c, T, C, HAS_SEQ)
        win, acc = _conv_bwd_step(yd, ed, fd, t + 3, win, acc, taps, bias, s0, own_end, dx_ptr,
                                  b, c, mask_c, T, C, HAS_SEQ)
        x3, x2, x1, g3, g2, g1, c3, c2, c1 = win
        dw0, dw1, dw2, dw3, db = acc
    # this program's partial [W + 1, C]: the W real taps of the padded four, then dbias
    base = part_ptr + (b * tl.num_programs(0) + pid_t) * (W + 1) * C + c
    if PAD < 1:
        tl.store(base + (0 - PAD) * C, dw0, mask=mask_c)
    if PAD < 2:
        tl.store(base + (1 - PAD) * C, dw1, mask=mask_c)
    if PAD < 3:
        tl.store(base + (2 - PAD) * C, dw2, mask=mask_c)
    tl.store(base + (3 - PAD) * C, dw3, mask=mask_c)
    tl.store(base + W * C, db, mask=mask_c)


@triton.jit
def _conv_bwd_reduce_kernel(part_ptr, dw_ptr, db_ptr, n, C, W: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dweight [C, 1, W] and dbias [C] in their own dtypes from the float32 partials
    [n, W + 1, C], as n rows of (W + 1) * C columns: BLOCK_N rows at a time per BLOCK_K
    columns, then one sum over the BLOCK_N slots (a fixed order: the same bits on every run)."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    i = tl.arange(0, BLOCK_N)
    K = (W + 1) * C
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        acc += tl.load(part_ptr + (start + i)[:, None] * K + k[None, :],
                       mask=((start + i) < n)[:, None] & (k < K)[None, :], other=0.0)
    total = tl.sum(acc, axis=0)
    tap, c = k // C, k % C
    tl.store(dw_ptr + c * W + tap, total.to(dw_ptr.dtype.element_ty), mask=(k < K) & (tap < W))
    tl.store(db_ptr + c, total.to(db_ptr.dtype.element_ty), mask=(k < K) & (tap == W))


def _env_choice(name: str, variants: dict, default: str) -> dict:
    """The config of the variant named by the environment variable ``name`` (default: default)."""
    choice = os.environ.get(name, default)
    if choice not in variants:
        raise ValueError(f"{name}={choice!r}: not one of {sorted(variants)}")
    return dict(variants[choice])


# Forward tilings ([rows, channels] per program; tools/bench/bench_fused_ops.py --shapes training
# times each). Selected by TRANSMAMBA_CONV_FWD, or by assigning ``_FWD``.
FWD_VARIANTS = {
    "32x64": dict(block_t=32, block_c=64, num_warps=4),
    "64x128": dict(block_t=64, block_c=128, num_warps=8),
    "16x256": dict(block_t=16, block_c=256, num_warps=4),
}
# one H200, 2026-12-02, [1, 8192, 4608] bf16: 16x256 0.069 ms, 32x64 0.089, 64x128 0.100
_FWD = _env_choice("TRANSMAMBA_CONV_FWD", FWD_VARIANTS, "16x256")

# Backward variants (docs/kernels.md has their predicted times). "tiles" is the 2D-tile kernel
# tuned at [8, 8192, 6144] (2.28 ms there); the "rows" kernels walk rows per thread, their rows
# per program chosen so the grid has about programs_per_sm programs per SM at any batch.
# Selected by TRANSMAMBA_CONV_BWD, or by assigning ``_BWD``.
BWD_VARIANTS = {
    "tiles": dict(kernel="tiles", block_t=128, block_c=32, tiles_per_program=16, num_warps=4,
                  gather_x=True),
    "rows": dict(kernel="rows", block_c=256, num_warps=4, programs_per_sm=8, prefetch=False),
    "rows-prefetch": dict(kernel="rows", block_c=256, num_warps=4, programs_per_sm=8,
                          prefetch=True),
    "rows-wide": dict(kernel="rows", block_c=512, num_warps=4, programs_per_sm=8, prefetch=False),
    "rows-1warp": dict(kernel="rows", block_c=128, num_warps=1, programs_per_sm=16,
                       prefetch=False),
}
# one H200, 2026-12-02, [1, 8192, 4608] bf16: rows 0.156 ms, rows-1warp 0.175, rows-wide 0.176,
# rows-prefetch 0.182, tiles 0.270 (memory floor 0.053)
_BWD = _env_choice("TRANSMAMBA_CONV_BWD", BWD_VARIANTS, "rows")


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132                  # an H100 / H200, for CPU runs and the compile check


def rows_per_program(batch: int, T: int, channel_blocks: int, programs_per_sm: int,
                     device: torch.device) -> int:
    """The largest power of two of rows (16 to 1024) that still gives programs_per_sm programs
    per SM: fewer rows mean more weight-gradient partials and halo rows, more mean fewer
    programs (and fewer loads in flight) per SM."""
    target = programs_per_sm * _num_sms(device)
    rows = max(1, batch * T * channel_blocks // target)
    return min(1024, max(16, 1 << (rows.bit_length() - 1)))


@custom_op("transmamba::causal_conv1d_silu")
def _conv_op(x: Tensor, weight: Tensor, bias: Tensor, seq_idx: Optional[Tensor]) -> Tensor:
    batch, T, C = x.shape
    cfg = _FWD
    out = torch.empty(batch, T, C, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(T, cfg["block_t"]), triton.cdiv(C, cfg["block_c"]), batch)
    _conv_fwd_kernel[grid](x, weight, bias, seq_idx if seq_idx is not None else bias, out, T, C,
                           x.stride(0), x.stride(1), W=weight.shape[-1], BLOCK_T=cfg["block_t"],
                           BLOCK_C=cfg["block_c"], HAS_SEQ=seq_idx is not None,
                           num_warps=cfg["num_warps"])
    return out


def _conv_bwd_tiles(dout, x, weight, bias, seq_idx, dx, cfg):
    """The 2D-tile backward -> float32 partials [B * programs along T, W + 1, C]."""
    batch, T, C = x.shape
    W = weight.shape[-1]
    block_t = max(cfg["block_t"], triton.next_power_of_2(2 * W))   # a tile owns >= 2 rows
    step = block_t - 2 * (W - 1)
    num_tiles = triton.cdiv(T, step)
    tiles_per_program = max(1, min(cfg["tiles_per_program"], num_tiles))
    blocks_t = triton.cdiv(num_tiles, tiles_per_program)
    partials = torch.empty(batch * blocks_t, W + 1, C, dtype=torch.float32, device=x.device)
    grid = (blocks_t, triton.cdiv(C, cfg["block_c"]), batch)
    _conv_bwd_kernel[grid](x, weight, bias, seq_idx if seq_idx is not None else bias, dout, dx,
                           partials, T, C, x.stride(0), x.stride(1), dout.stride(0),
                           dout.stride(1), num_tiles, tiles_per_program, W=W,
                           W_POW2=triton.next_power_of_2(W), BLOCK_T=block_t,
                           BLOCK_C=cfg["block_c"], HAS_SEQ=seq_idx is not None,
                           GATHER_X=cfg["gather_x"], num_warps=cfg["num_warps"])
    return partials


def _conv_bwd_rows(dout, x, weight, bias, seq_idx, dx, cfg):
    """The row-walking backward (W <= 4) -> float32 partials [B * programs along T, W + 1, C]."""
    batch, T, C = x.shape
    W = weight.shape[-1]
    channel_blocks = triton.cdiv(C, cfg["block_c"])
    rows = rows_per_program(batch, T, channel_blocks, cfg["programs_per_sm"], x.device)
    blocks_t = triton.cdiv(T, rows)
    partials = torch.empty(batch * blocks_t, W + 1, C, dtype=torch.float32, device=x.device)
    _conv_bwd_rows_kernel[(blocks_t, channel_blocks, batch)](
        x, weight, bias, seq_idx if seq_idx is not None else bias, dout, dx, partials, T, C,
        x.stride(0), x.stride(1), dout.stride(0), dout.stride(1), rows, W=W,
        BLOCK_C=cfg["block_c"], HAS_SEQ=seq_idx is not None, PREFETCH=cfg["prefetch"],
        num_warps=cfg["num_warps"])
    return partials


@custom_op("transmamba::causal_conv1d_silu_backward")
def _conv_backward_op(dout: Tensor, x: Tensor, weight: Tensor, bias: Tensor,
                      seq_idx: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """-> dx [B, T, C], dweight [C, 1, W], dbias [C], each in its input's dtype."""
    C, W = x.shape[-1], weight.shape[-1]
    cfg = _BWD
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    # one fp32 partial per program along T (deterministic, unlike atomics)
    if cfg["kernel"] == "rows" and W <= 4:
        partials = _conv_bwd_rows(dout, x, weight, bias, seq_idx, dx, cfg)
    else:                       # wider windows: the 2D tiles (at their own default tiling)
        tiles = cfg if cfg["kernel"] == "tiles" else BWD_VARIANTS["tiles"]
        partials = _conv_bwd_tiles(dout, x, weight, bias, seq_idx, dx, tiles)
    dweight = torch.empty(C, 1, W, dtype=weight.dtype, device=x.device)
    dbias = torch.empty(C, dtype=bias.dtype, device=x.device)
    _conv_bwd_reduce_kernel[(triton.cdiv((W + 1) * C, 128),)](
        partials, dweight, dbias, partials.shape[0], C, W=W, BLOCK_N=16, BLOCK_K=128)
    return dx, dweight, dbias


@_conv_op.register_fake
def _(x, weight, bias, seq_idx):
    return x.new_empty(x.shape)


@_conv_backward_op.register_fake
def _(dout, x, weight, bias, seq_idx):
    return x.new_empty(x.shape), torch.empty_like(weight), torch.empty_like(bias)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    x, weight, bias, seq_idx = ctx.saved_tensors
    dx, dweight, dbias = _conv_backward_op(dout, x, weight, bias, seq_idx)
    return dx, dweight, dbias, None


_conv_op.register_autograd(_backward, setup_context=_setup)


def causal_conv1d_silu_triton(x, weight, bias, seq_idx=None):
    """Fused ``causal_conv1d_silu_naive``: x [B, T, C] (any batch and token strides with a unit
    channel stride, read in place: the xBC column slice of the in-projection output), weight
    [C, 1, W], bias [C] (bf16 or fp32), seq_idx [B, T] integer document index or None ->
    [B, T, C] contiguous in x's dtype; gradients in each input's dtype. Forward 1 kernel,
    backward 2."""
    if x.dim() != 3 or weight.shape[0] != x.shape[-1] or weight.dim() != 3 or bias.shape != (x.shape[-1],):
        raise ValueError(f"x must be [B, T, C], weight [C, 1, W], bias [C]; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(bias.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dtype == torch.float64:
        raise TypeError("causal_conv1d_silu_triton: float64 is not supported (use the naive op)")
    if seq_idx is not None:
        if seq_idx.shape != x.shape[:2] or seq_idx.is_floating_point():
            raise ValueError(f"seq_idx must be an integer [B, T] = {list(x.shape[:2])} tensor, "
                             f"got {seq_idx.dtype} {tuple(seq_idx.shape)}")
        seq_idx = seq_idx.contiguous()
    return _conv_op(x, weight.contiguous(), bias.contiguous(), seq_idx)
