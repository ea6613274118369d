"""Rotary position embedding on the model's torch path: the reference math
(``transmamba_kernels.reference.rope``) with cos and sin cached per table.

The table has megatron-core's RotaryEmbedding layout [S, 1, 1, dim] (angles duplicated over the
two halves), so the ``*`` layers pass it straight to megatron-core's SelfAttention; the
TransMamba mixer applies it to Q = C and K = B of its attention segment only.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from transmamba_kernels.reference.rope import rope_cos_sin, rope_table, rotate

__all__ = ["apply_rope", "apply_rope_at", "rope_table"]

# cos and sign-folded sin of each table (the model passes one table to every layer), per
# compute dtype, rebuilt when the table changes in place: every layer slices them instead of
# launching cos/sin/neg kernels again.
_TRIG = WeakIdKeyDictionary()


def _cos_sin(table: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """``rope_cos_sin`` of the table's angles [S, dim] in ``acc``, cached per table."""
    cached = _TRIG.get(table, {}).get(acc)
    if cached is not None and cached[0] == table._version:
        return cached[1]
    with torch.no_grad():
        value = rope_cos_sin(table[:, 0, 0], acc)
    _TRIG.setdefault(table, {})[acc] = (table._version, value)
    return value


def _trig(table: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """``_cos_sin``, or computed inline under torch.compile (the cache is host state; compiled
    code fuses cos/sin)."""
    if not torch.compiler.is_compiling():
        return _cos_sin(table, acc)
    return rope_cos_sin(table[:, 0, 0], acc)


def apply_rope(t: Tensor, table: Tensor) -> Tensor:
    """Rotate t [B, p, heads, dim] by the angles of positions 0..p-1 in ``table``
    (``transmamba_kernels.reference.rope.apply_rope`` with cached cos and sin)."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    cos, signed_sin = _trig(table, acc)
    p = t.shape[1]
    return rotate(t, cos[None, :p, None, :], signed_sin[None, :p, None, :])


def apply_rope_at(t: Tensor, table: Tensor, position_ids: Tensor) -> Tensor:
    """``apply_rope`` with each token at its own position: t [B, S, heads, dim] rotated by the
    angles of ``position_ids`` [B, S] (< len(table); packed documents under context
    parallelism: positions inside each document)."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    cos, signed_sin = _trig(table, acc)
    return rotate(t, cos[position_ids][:, :, None], signed_sin[position_ids][:, :, None])
