"""Rotary position embedding (rotate-half convention): the one implementation of its math.

RoFormer (Su et al. 2021), eq. 34 in the rotate-half form used by GPT-NeoX and megatron-core:
x_rot = x cos(theta) + rotate_half(x) sin(theta), rotate_half(x) = [-x2, x1] for the halves
x1 = x[..., :dim/2], x2 = x[..., dim/2:], computed as x cos + roll(x, dim/2) * signed sin with
the sine's first half negated; float32 math, float64 for float64 inputs. Angle tables have
megatron-core's RotaryEmbedding layout [S, 1, 1, dim] (angles duplicated over the two halves,
float32). The model's torch path (``megatron_transmamba.layers.rotary``, which only caches cos
and sin), decoding and the exported Hugging Face model all rotate through ``rotate``;
``rope_qk_naive`` is the specification of the fused Triton kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rope_angles(positions: Tensor, dim: int, theta: float) -> Tensor:
    """Table rows [S, 1, 1, dim] (float32) of the integer ``positions`` [S]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                            device=positions.device) / dim)
    angles = torch.outer(positions.to(torch.float32), inv_freq)
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]


def rope_table(seq_len: int, dim: int, theta: float, device=None) -> Tensor:
    """Angles [seq_len, 1, 1, dim] for positions 0..seq_len-1 (float32)."""
    return rope_angles(torch.arange(seq_len, device=device), dim, theta)


def rope_cos_sin(angles: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sign-folded sin of ``angles`` [..., dim] in ``acc``: the sine's first half is
    negated (the rotate-half sign), so ``rotate`` needs no negation of its own."""
    angles = angles.to(acc)
    half = angles.shape[-1] // 2
    sin = angles.sin()
    return angles.cos(), torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rotate(t: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """t [..., dim] rotated: t cos + roll(t, dim/2) signed_sin (cos, sin broadcast to t, in the
    compute dtype), returned in t's dtype."""
    t_acc = t.to(_acc(t.dtype))
    rolled = torch.roll(t_acc, t.shape[-1] // 2, dims=-1)
    return torch.addcmul(t_acc * cos, rolled, signed_sin).to(t.dtype)


def apply_rope(t: Tensor, table: Tensor) -> Tensor:
    """Rotate t [B, S, heads, dim] by rows 0..S-1 of ``table`` [>= S, 1, 1, dim] (pass
    ``table[offset:]`` or ``rope_angles(positions, ...)`` for other positions)."""
    cos, signed_sin = rope_cos_sin(table[: t.shape[1], 0, 0], _acc(t.dtype))
    return rotate(t, cos[None, :, None], signed_sin[None, :, None])


def apply_rope_at(t: Tensor, table: Tensor, position_ids: Tensor) -> Tensor:
    """Rotate t [B, S, heads, dim] with each token at its own position: ``position_ids`` [B, S]
    (< len(table))."""
    cos, signed_sin = rope_cos_sin(table[:, 0, 0], _acc(t.dtype))
    return rotate(t, cos[position_ids][:, :, None], signed_sin[position_ids][:, :, None])


def rope_qk_naive(q: Tensor, k: Tensor, table: Tensor, seq_first: bool = False):
    """Rotate q [B, S, Hq, dim] and k [B, S, Hk, dim] (or [S, B, heads, dim] when
    ``seq_first``) by the angles of positions 0..S-1 of ``table``: [S_table, 1, 1, dim] as
    ``rope_table`` builds it, or [S_table, B, 1, dim] for packed documents (per-row
    positions), S_table >= S. Returns (q_rot, k_rot) in the inputs' dtypes and layouts."""
    if seq_first:
        q_rot, k_rot = rope_qk_naive(q.transpose(0, 1), k.transpose(0, 1), table, False)
        return q_rot.transpose(0, 1), k_rot.transpose(0, 1)
    angles = table[: q.shape[1]].transpose(0, 1)        # [B or 1, S, 1, dim]
    return tuple(rotate(t, *rope_cos_sin(angles, _acc(t.dtype))) for t in (q, k))
