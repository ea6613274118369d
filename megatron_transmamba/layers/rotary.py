"""Rotary position embedding tables and their application (rotate-half convention).

The table has megatron-core's RotaryEmbedding layout [S, 1, 1, dim] (angles duplicated over the
two halves), so the ``*`` layers pass it straight to megatron-core's SelfAttention; the
TransMamba mixer applies it to Q = C and K = B of its attention segment only.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_table(seq_len: int, dim: int, theta: float, device=None) -> Tensor:
    """Angles [seq_len, 1, 1, dim] for positions 0..seq_len-1 (float32)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]


def apply_rope(t: Tensor, table: Tensor) -> Tensor:
    """Rotate t [B, p, heads, dim] by the angles of positions 0..p-1 in ``table``."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    angles = table[: t.shape[1], 0, 0].to(acc)                          # [p, dim]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    t_acc = t.to(acc)
    half = t.shape[-1] // 2
    rotated = torch.cat([-t_acc[..., half:], t_acc[..., :half]], dim=-1)
    return (t_acc * cos + rotated * sin).to(t.dtype)
