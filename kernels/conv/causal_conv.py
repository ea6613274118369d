"""Fused causal depthwise conv1d + bias + SiLU over [B, T, C] (Triton), forward and backward.

Same function as ``naive.causal_conv1d_silu_naive`` without the channels-first copies: one
program reads a [BLOCK_T + W - 1, BLOCK_C] window of the input once and writes its outputs.
The backward recomputes the pre-activation, returns the input gradient (the transposed
convolution of the SiLU-scaled output gradient) and per-program partial sums of the weight and
bias gradients, added in PyTorch. With packed documents (``seq_idx`` [B, T]) a tap whose token
lies in another document than the output token reads zero, forward and backward (the
``HAS_SEQ`` specialisation; without it the kernels are unchanged).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, seq_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr, T, C,
                     stride_b, stride_t, W: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_C: tl.constexpr, HAS_SEQ: tl.constexpr):
    """dx[s] = sum_j w[j] g[s + (W-1) - j] with g = dout * SiLU'(pre); partial dw, db. With
    seq_idx only pairs (s, t) of the same document contribute."""
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    bias = tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    s = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)           # input positions this program owns
    dx = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    program = (b * tl.num_programs(0) + pid_t)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_SEQ:
        doc_s = tl.load(seq_ptr + b * T + s, mask=s < T, other=-1)
    for k in tl.static_range(W):
        # g at output positions t = s + k, which read input s through tap j = W - 1 - k
        t = s + k
        valid_t = (t < T)[:, None] & mask_c[None, :]
        pre = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32) + bias[None, :]
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
            pre += xv.to(tl.float32) * wj[None, :]
        sig = tl.sigmoid(pre)
        dout = tl.load(dout_ptr + (b * T + t[:, None]) * C + c[None, :], mask=valid_t, other=0.0)
        g = dout.to(tl.float32) * sig * (1.0 + pre * (1.0 - sig))
        g = tl.where(valid_t, g, 0.0)
        wk = tl.load(w_ptr + c * W + (W - 1 - k), mask=mask_c, other=0.0).to(tl.float32)
        if HAS_SEQ:  # output t reads input s only inside one document
            g_s = tl.where((doc_t == doc_s)[:, None], g, 0.0)
            dx += g_s * wk[None, :]
        else:
            dx += g * wk[None, :]
        if k == 0:
            # each output position t = s is visited once (k = 0): bias and weight gradients
            db += tl.sum(g, axis=0)
            for j in tl.static_range(W):
                src = s - (W - 1) + j
                read = (src >= 0) & (src < T)
                if HAS_SEQ:
                    read = read & (tl.load(seq_ptr + b * T + src, mask=read, other=-1) == doc_s)
                xv = tl.load(x_ptr + b * stride_b + src[:, None] * stride_t + c[None, :],
                             mask=read[:, None] & mask_c[None, :], other=0.0)
                tl.store(dw_ptr + (program * W + j) * C + c, tl.sum(g * xv.to(tl.float32), axis=0),
                         mask=mask_c)
    tl.store(db_ptr + program * C + c, db, mask=mask_c)
    tl.store(dx_ptr + (b * T + s[:, None]) * C + c[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=(s[:, None] < T) & mask_c[None, :])


_BLOCK_T, _BLOCK_C = 32, 64


class _CausalConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx):
        batch, T, C = x.shape
        W = weight.shape[-1]
        w = weight.reshape(C, W).contiguous()
        out = torch.empty(batch, T, C, dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(T, _BLOCK_T), triton.cdiv(C, _BLOCK_C), batch)
        _conv_fwd_kernel[grid](x, w, bias, seq_idx if seq_idx is not None else bias, out, T, C,
                               x.stride(0), x.stride(1), W=W, BLOCK_T=_BLOCK_T, BLOCK_C=_BLOCK_C,
                               HAS_SEQ=seq_idx is not None)
        ctx.save_for_backward(x, w, bias, seq_idx)
        ctx.weight_shape = weight.shape
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w, bias, seq_idx = ctx.saved_tensors
        batch, T, C = x.shape
        W = w.shape[-1]
        dout = dout.contiguous()
        blocks_t = triton.cdiv(T, _BLOCK_T)
        programs = batch * blocks_t
        dx = torch.empty(batch, T, C, dtype=x.dtype, device=x.device)
        dw = torch.empty(programs, W, C, dtype=torch.float32, device=x.device)
        db = torch.empty(programs, C, dtype=torch.float32, device=x.device)
        grid = (blocks_t, triton.cdiv(C, _BLOCK_C), batch)
        _conv_bwd_kernel[grid](x, w, bias, seq_idx if seq_idx is not None else bias, dout, dx, dw,
                               db, T, C, x.stride(0), x.stride(1), W=W, BLOCK_T=_BLOCK_T,
                               BLOCK_C=_BLOCK_C, HAS_SEQ=seq_idx is not None)
        dweight = dw.sum(0).t().reshape(ctx.weight_shape).to(w.dtype)
        return dx, dweight, db.sum(0).to(bias.dtype), None


def causal_conv1d_silu_triton(x, weight, bias, seq_idx=None):
    """Fused ``causal_conv1d_silu_naive``: x [B, T, C] (any strides with a unit channel
    stride), weight [C, 1, W], bias [C], seq_idx [B, T] integer document index or None ->
    [B, T, C] contiguous."""
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
        seq_idx = seq_idx.to(torch.int32).contiguous()
    return _CausalConvSiLU.apply(x, weight, bias, seq_idx)
