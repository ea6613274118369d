"""Grouped RMSNorm, gated by SiLU(z) on SSM tokens only: the specification of the fused kernel.

TransMamba's output norm (DESIGN section 1, step 6): tokens t >= p (SSM) are gated first,
o = RMSNorm_G(y * SiLU(z)) * w (Mamba-2's norm_before_gate=False); tokens t < p (attention,
the paper's "attention w/o z") are normalised without the gate. RMSNorm_G normalises each of
G groups of C/G channels on its own, so the norm stays local to a tensor-parallel rank. With
packed documents t is the position inside the token's document (``position_ids``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def gated_rmsnorm_naive(y: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float,
                        transpoint: int, position_ids: Optional[Tensor] = None) -> Tensor:
    """y, z: [B, T, C]; weight: [C]; position_ids: [B, T] integer position of each token (in
    its document), None for 0..T-1 in every row. Tokens at positions >= transpoint are gated.
    Returns [B, T, C] in y's dtype (float32 math, float64 for float64 inputs)."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    h = y.to(acc)
    if position_ids is not None:
        if position_ids.shape != y.shape[:2] or position_ids.is_floating_point():
            raise ValueError(f"position_ids must be an integer [B, T] = {list(y.shape[:2])} "
                             f"tensor, got {position_ids.dtype} {tuple(position_ids.shape)}")
        gated = (position_ids >= int(transpoint))[..., None]
        h = torch.where(gated, h * F.silu(z.to(acc)), h)
    else:
        p = max(0, min(int(transpoint), y.shape[1]))
        if p < y.shape[1]:
            gate = F.silu(z[:, p:].to(acc))
            h = torch.cat([h[:, :p], h[:, p:] * gate], dim=1) if p else h * gate
    batch, seq_len, width = h.shape
    h = h.view(batch, seq_len, groups, width // groups)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h.view(batch, seq_len, width) * weight.to(acc)).to(y.dtype)
