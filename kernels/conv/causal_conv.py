"""Fused causal depthwise conv1d + bias + SiLU over [B, T, C] (Triton), forward and backward.

Same function as ``naive.causal_conv1d_silu_naive`` without the channels-first copies: one
forward program reads a [BLOCK_T + W - 1, BLOCK_C] window of the input and writes its outputs.
The backward program loads a tile of x and of the output gradient once, recomputes the
pre-activation once per row, forms g = dout * SiLU'(pre), and gets the input gradient as the
transposed convolution of g (dx[s] = sum_k w[W-1-k] g[s+k]) from row-shifted copies of the tile
in registers; the weight and bias gradients are summed in registers over the program's tiles and
written as one float32 partial per program, which ``_conv_bwd_reduce_kernel`` adds in a fixed
order (no atomics: the same bits on every run): forward 1 kernel, backward 2. With packed
documents (``seq_idx`` [B, T]) a tap whose token lies in another document than the output token
reads zero, forward and backward (the ``HAS_SEQ`` specialisation; without it the kernels are
unchanged). The op is a ``torch.library.custom_op`` (``transmamba::causal_conv1d_silu``) so
``torch.compile(fullgraph=True)`` traces through it.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

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
def _conv_bwd_reduce_kernel(part_ptr, dw_ptr, db_ptr, n, C, W: tl.constexpr,
                            W1_POW2: tl.constexpr, BLOCK_C: tl.constexpr):
    """dweight [C, 1, W] and dbias [C] in their own dtypes from the float32 partials
    [n, W + 1, C], summed over n in a fixed order."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    taps = tl.arange(0, W1_POW2)
    mask = (taps <= W)[:, None] & (c < C)[None, :]
    acc = tl.zeros([W1_POW2, BLOCK_C], dtype=tl.float32)
    for i in range(n):
        acc += tl.load(part_ptr + (i * (W + 1) + taps[:, None]) * C + c[None, :], mask=mask,
                       other=0.0)
    tl.store(dw_ptr + c[None, :] * W + taps[:, None], acc.to(dw_ptr.dtype.element_ty),
             mask=(taps < W)[:, None] & (c < C)[None, :])
    db = tl.sum(tl.where((taps == W)[:, None], acc, 0.0), axis=0)
    tl.store(db_ptr + c, db.to(db_ptr.dtype.element_ty), mask=c < C)


_BLOCK_T, _BLOCK_C = 32, 64
# Backward tiling (tools/bench/bench_fused_ops.py times the alternatives on the GPU). One H200,
# [8, 8192, 6144] bf16, 2026-11-28: 128 rows x 32 channels, 4 warps, gathered x shifts 2.28 ms
# backward, against 3.55 ms for 64 x 64 and 2.49 ms with loads instead of gathers at 128 x 32.
_BWD = dict(block_t=128, block_c=32, tiles_per_program=16, num_warps=4, gather_x=True)


@torch.library.custom_op("transmamba::causal_conv1d_silu", mutates_args=())
def _conv_op(x: Tensor, weight: Tensor, bias: Tensor, seq_idx: Optional[Tensor]) -> Tensor:
    batch, T, C = x.shape
    out = torch.empty(batch, T, C, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(T, _BLOCK_T), triton.cdiv(C, _BLOCK_C), batch)
    _conv_fwd_kernel[grid](x, weight, bias, seq_idx if seq_idx is not None else bias, out, T, C,
                           x.stride(0), x.stride(1), W=weight.shape[-1], BLOCK_T=_BLOCK_T,
                           BLOCK_C=_BLOCK_C, HAS_SEQ=seq_idx is not None)
    return out


@torch.library.custom_op("transmamba::causal_conv1d_silu_backward", mutates_args=())
def _conv_backward_op(dout: Tensor, x: Tensor, weight: Tensor, bias: Tensor,
                      seq_idx: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """-> dx [B, T, C], dweight [C, 1, W], dbias [C], each in its input's dtype."""
    batch, T, C = x.shape
    W = weight.shape[-1]
    cfg = _BWD
    block_t = max(cfg["block_t"], triton.next_power_of_2(2 * W))   # a tile owns >= 2 rows
    step = block_t - 2 * (W - 1)
    num_tiles = triton.cdiv(T, step)
    tiles_per_program = max(1, min(cfg["tiles_per_program"], num_tiles))
    blocks_t = triton.cdiv(num_tiles, tiles_per_program)
    dx = torch.empty(batch, T, C, dtype=x.dtype, device=x.device)
    # one fp32 partial per program (deterministic, unlike atomics): blocks_t * B * (W + 1) * C,
    # about 9 MB at [8, 8192, 6144]
    partials = torch.empty(batch * blocks_t, W + 1, C, dtype=torch.float32, device=x.device)
    grid = (blocks_t, triton.cdiv(C, cfg["block_c"]), batch)
    _conv_bwd_kernel[grid](x, weight, bias, seq_idx if seq_idx is not None else bias, dout, dx,
                           partials, T, C, x.stride(0), x.stride(1), dout.stride(0),
                           dout.stride(1), num_tiles, tiles_per_program, W=W,
                           W_POW2=triton.next_power_of_2(W), BLOCK_T=block_t,
                           BLOCK_C=cfg["block_c"], HAS_SEQ=seq_idx is not None,
                           GATHER_X=cfg["gather_x"], num_warps=cfg["num_warps"])
    dweight = torch.empty(C, 1, W, dtype=weight.dtype, device=x.device)
    dbias = torch.empty(C, dtype=bias.dtype, device=x.device)
    _conv_bwd_reduce_kernel[(triton.cdiv(C, 128),)](partials, dweight, dbias, batch * blocks_t, C,
                                                    W=W, W1_POW2=triton.next_power_of_2(W + 1),
                                                    BLOCK_C=128)
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
    dx, dweight, dbias = torch.ops.transmamba.causal_conv1d_silu_backward(dout, x, weight, bias,
                                                                         seq_idx)
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
    return torch.ops.transmamba.causal_conv1d_silu(x, weight.contiguous(), bias.contiguous(),
                                                   seq_idx)
