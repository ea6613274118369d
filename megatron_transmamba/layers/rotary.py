"""Rotary position embedding tables and their application (rotate-half convention).

The table has megatron-core's RotaryEmbedding layout [S, 1, 1, dim] (angles duplicated over the
two halves), so the ``*`` layers pass it straight to megatron-core's SelfAttention; the
TransMamba mixer applies it to Q = C and K = B of its attention segment only.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

# cos and sign-folded sin of each table (the model passes one table to every layer), per
# compute dtype, rebuilt when the table changes in place: every layer slices them instead of
# launching cos/sin/neg kernels again.
_TRIG = WeakIdKeyDictionary()


def rope_table(seq_len: int, dim: int, theta: float, device=None) -> Tensor:
    """Angles [seq_len, 1, 1, dim] for positions 0..seq_len-1 (float32)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]


def _cos_sin(table: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin [S, dim] of the table's angles in ``acc``, the sin's first half negated (the
    rotate-half sign)."""
    cached = _TRIG.get(table, {}).get(acc)
    if cached is not None and cached[0] == table._version:
        return cached[1]
    with torch.no_grad():
        angles = table[:, 0, 0].to(acc)
        half = angles.shape[-1] // 2
        sin = angles.sin()
        sin[:, :half].neg_()
        value = (angles.cos(), sin)
    _TRIG.setdefault(table, {})[acc] = (table._version, value)
    return value


def _trig(table: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """``_cos_sin``, or computed inline under torch.compile (the cache is host state; compiled
    code fuses cos/sin)."""
    if not torch.compiler.is_compiling():
        return _cos_sin(table, acc)
    angles = table[:, 0, 0].to(acc)
    half = angles.shape[-1] // 2
    sin = angles.sin()
    return angles.cos(), torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)


def _rotate(t: Tensor, cos: Tensor, signed_sin: Tensor, acc: torch.dtype) -> Tensor:
    t_acc = t.to(acc)
    rolled = torch.roll(t_acc, t.shape[-1] // 2, dims=-1)
    return torch.addcmul(t_acc * cos, rolled, signed_sin).to(t.dtype)


def apply_rope(t: Tensor, table: Tensor) -> Tensor:
    """Rotate t [B, p, heads, dim] by the angles of positions 0..p-1 in ``table``:
    t cos + rotate_half(t) sin, with rotate_half(t) = [-t2, t1] = roll(t, dim/2) * sign."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    cos, signed_sin = _trig(table, acc)
    p = t.shape[1]
    return _rotate(t, cos[None, :p, None, :], signed_sin[None, :p, None, :], acc)


def apply_rope_at(t: Tensor, table: Tensor, position_ids: Tensor) -> Tensor:
    """``apply_rope`` with each token at its own position: t [B, S, heads, dim] rotated by the
    angles of ``position_ids`` [B, S] (< len(table); packed documents under context
    parallelism: positions inside each document)."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    cos, signed_sin = _trig(table, acc)
    return _rotate(t, cos[position_ids][:, :, None], signed_sin[position_ids][:, :, None], acc)
