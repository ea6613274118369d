"""Rotary position embedding of Q and K (rotate-half convention): the specification of the
fused kernel.

RoFormer (Su et al. 2021), eq. 34 in the rotate-half form used by GPT-NeoX and megatron-core:
x_rot = x cos(theta) + rotate_half(x) sin(theta), rotate_half(x) = [-x2, x1] for the halves
x1 = x[..., :dim/2], x2 = x[..., dim/2:], the same arithmetic as
``megatron_transmamba.layers.rotary.apply_rope`` (float32 math, float64 for float64 inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rotate(t: Tensor, angles: Tensor) -> Tensor:
    """t [B, S, heads, dim] rotated by angles [B or 1, S, 1, dim] (apply_rope's arithmetic)."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    angles = angles.to(acc)
    half = t.shape[-1] // 2
    sin = angles.sin()
    sin[..., :half].neg_()
    t_acc = t.to(acc)
    rolled = torch.roll(t_acc, half, dims=-1)
    return torch.addcmul(t_acc * angles.cos(), rolled, sin).to(t.dtype)


def rope_qk_naive(q: Tensor, k: Tensor, table: Tensor, seq_first: bool = False):
    """Rotate q [B, S, Hq, dim] and k [B, S, Hk, dim] (or [S, B, heads, dim] when
    ``seq_first``) by the angles of positions 0..S-1 of ``table``: [S_table, 1, 1, dim] as
    ``rotary.rope_table`` builds it, or [S_table, B, 1, dim] for packed documents (per-row
    positions), S_table >= S. Returns (q_rot, k_rot) in the inputs' dtypes and layouts."""
    if seq_first:
        q_rot, k_rot = rope_qk_naive(q.transpose(0, 1), k.transpose(0, 1), table, False)
        return q_rot.transpose(0, 1), k_rot.transpose(0, 1)
    angles = table[: q.shape[1]].transpose(0, 1)        # [B or 1, S, 1, dim]
    return _rotate(q, angles), _rotate(k, angles)
