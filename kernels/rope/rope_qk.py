"""Rotary position embedding of Q and K in one Triton launch, forward and backward.

Same function as ``naive.rope_qk_naive`` (RoFormer eq. 34, rotate-half convention): one
program rotates TOKENS tokens of both q and k. For each token it loads the token's angles
(float32), takes cos and sin once in registers and rotates every head of q and of k, so the
pair costs one launch and no cos/sin tensors. q and k may be any strided views (e.g. slices of
the conv output xBC, or megatron's [S, B, heads, dim]); the outputs are contiguous in the
inputs' layout. The backward is the same kernel rotating the two gradients by the inverse
(transposed) rotation. Both are ``torch.library`` custom ops (``transmamba::rope_qk``), so
``torch.compile`` keeps them whole.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..custom_op import custom_op

__all__ = ["rope_qk_triton"]


@triton.jit
def _rotate_heads(x_ptr, o_ptr, x_base, o_base, heads, s_h, s_d, c1, s1, c2, s2, HALF,
                  INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotates the heads of one token: x at x_base (+ h s_h + d s_d), out contiguous [heads, dim]."""
    d = tl.arange(0, BLOCK_HALF)[None, :]
    for h0 in range(0, heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)[:, None]
        mask = (h < heads) & (d < HALF)
        x_off = x_base + h * s_h + d * s_d
        o_off = o_base + h * (2 * HALF) + d
        x1 = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + x_off + HALF * s_d, mask=mask, other=0.0).to(tl.float32)
        if INVERSE:   # the transpose: dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:         # [x1, x2] cos + [-x2, x1] sin
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(o_ptr + o_off, y1.to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(o_ptr + o_off + HALF, y2.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_qk_kernel(q_ptr, k_ptr, table_ptr, qo_ptr, ko_ptr, tokens, D1, HQ, HK, HALF,
                    sq0, sq1, sq_h, sq_d, sk0, sk1, sk_h, sk_d, st0, st1, st_d,
                    INVERSE: tl.constexpr, TOKENS: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_HALF: tl.constexpr):
    # token t = i0 * D1 + i1 over the two leading dims (i0, i1) of the layout; the table's
    # strides st0, st1 are those of the position (and, packed, batch) along each of them
    d = tl.arange(0, BLOCK_HALF)[None, :]
    for i in range(TOKENS):
        t = tl.program_id(0).to(tl.int64) * TOKENS + i
        if t < tokens:
            i0, i1 = t // D1, t % D1
            angle = table_ptr + i0 * st0 + i1 * st1 + d * st_d
            a1 = tl.load(angle, mask=d < HALF, other=0.0).to(tl.float32)
            a2 = tl.load(angle + HALF * st_d, mask=d < HALF, other=0.0).to(tl.float32)
            c1, s1 = tl.cos(a1), tl.sin(a1)
            c2, s2 = tl.cos(a2), tl.sin(a2)
            _rotate_heads(q_ptr, qo_ptr, i0 * sq0 + i1 * sq1, t * HQ * 2 * HALF, HQ, sq_h, sq_d,
                          c1, s1, c2, s2, HALF, INVERSE, BLOCK_H, BLOCK_HALF)
            _rotate_heads(k_ptr, ko_ptr, i0 * sk0 + i1 * sk1, t * HK * 2 * HALF, HK, sk_h, sk_d,
                          c1, s1, c2, s2, HALF, INVERSE, BLOCK_H, BLOCK_HALF)


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_TOKENS = 2 if _INTERPRET else 4   # tokens per program
_MAX_BLOCK_H = 16


def _rope_qk(q: Tensor, k: Tensor, table: Tensor, seq_first: bool, inverse: bool):
    """Launcher: q [D0, D1, Hq, dim], k [D0, D1, Hk, dim] with (D0, D1) = (B, S), or (S, B)
    when ``seq_first``; table [S_table, 1 or B, 1, dim] -> contiguous rotated q, k."""
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), \
        torch.empty(k.shape, dtype=k.dtype, device=k.device)
    d0, d1, _, dim = q.shape
    if q_out.numel() + k_out.numel() == 0:
        return q_out, k_out
    # table strides along the position and batch dims (a [S, 1, 1, dim] table repeats its
    # angles over the batch)
    st_s = table.stride(0)
    st_b = table.stride(1) if table.shape[1] > 1 else 0
    st0, st1 = (st_s, st_b) if seq_first else (st_b, st_s)
    heads = max(q.shape[2], k.shape[2])
    grid = (triton.cdiv(d0 * d1, _TOKENS),)
    _rope_qk_kernel[grid](q, k, table, q_out, k_out, d0 * d1, d1, q.shape[2], k.shape[2],
                          dim // 2, *q.stride(), *k.stride(), st0, st1, table.stride(3),
                          INVERSE=inverse, TOKENS=_TOKENS,
                          BLOCK_H=min(triton.next_power_of_2(heads), _MAX_BLOCK_H),
                          BLOCK_HALF=triton.next_power_of_2(dim // 2))
    return q_out, k_out


@custom_op("transmamba::rope_qk")
def _rope_qk_op(q: Tensor, k: Tensor, table: Tensor, seq_first: bool,
                inverse: bool) -> tuple[Tensor, Tensor]:
    return _rope_qk(q, k, table, seq_first, inverse)


@_rope_qk_op.register_fake
def _(q, k, table, seq_first, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])
    ctx.seq_first, ctx.inverse = inputs[3], inputs[4]


def _backward(ctx, dq_rot, dk_rot):
    (table,) = ctx.saved_tensors
    dq, dk = _rope_qk_op(dq_rot, dk_rot, table, ctx.seq_first, not ctx.inverse)
    return dq, dk, None, None, None


_rope_qk_op.register_autograd(_backward, setup_context=_setup_context)


def rope_qk_triton(q: Tensor, k: Tensor, table: Tensor, seq_first: bool = False):
    """Fused ``rope_qk_naive``: q [B, S, Hq, dim], k [B, S, Hk, dim] (or [S, B, heads, dim]
    when ``seq_first``), any strides (views into a larger tensor are read in place); table
    [S_table, 1, 1, dim] from ``rotary.rope_table``, or [S_table, B, 1, dim] for packed
    documents, S_table >= S, float32 angles (rows 0..S-1 are used: pass q[:, :p] to rotate the
    first p tokens). Returns (q_rot, k_rot), contiguous [B, S, heads, dim] (or [S, B, ...]),
    in the inputs' dtypes; the math is float32. One kernel launch forward, one backward."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must be [B, S, heads, dim] with equal B, S, dim; got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    dim = q.shape[3]
    batch, seq = (q.shape[1], q.shape[0]) if seq_first else (q.shape[0], q.shape[1])
    if dim % 2:
        raise ValueError(f"rope needs an even head dim, got {dim}")
    if (table.dim() != 4 or table.shape[0] < seq or table.shape[1] not in (1, batch)
            or table.shape[2] != 1 or table.shape[3] != dim or not table.is_floating_point()):
        raise ValueError(f"table must be float [S_table >= {seq}, 1 or {batch}, 1, {dim}], got "
                         f"{table.dtype} {tuple(table.shape)}")
    if torch.float64 in (q.dtype, k.dtype):
        raise TypeError("rope_qk_triton: float64 is not supported (use rope_qk_naive)")
    return _rope_qk_op(q, k, table, bool(seq_first), False)
