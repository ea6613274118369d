"""Grouped RMSNorm, gated by SiLU(z) on SSM tokens only: the specification of the fused kernel.

TransMamba's output norm (DESIGN section 1, step 6): tokens t >= p (SSM) are gated first,
o = RMSNorm_G(y * SiLU(z)) * w (Mamba-2's norm_before_gate=False); tokens t < p (attention,
the paper's "attention w/o z") are normalised without the gate. RMSNorm_G normalises each of
G groups of C/G channels on its own, so the norm stays local to a tensor-parallel rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gated_rmsnorm_naive(y: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float,
                        transpoint: int) -> Tensor:
    """y, z: [B, T, C]; weight: [C]; returns [B, T, C] in y's dtype (float32 math, float64 for
    float64 inputs)."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    h = y.to(acc)
    p = max(0, min(int(transpoint), y.shape[1]))
    if p < y.shape[1]:
        gate = F.silu(z[:, p:].to(acc))
        h = torch.cat([h[:, :p], h[:, p:] * gate], dim=1) if p else h * gate
    batch, seq_len, width = h.shape
    h = h.view(batch, seq_len, groups, width // groups)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h.view(batch, seq_len, width) * weight.to(acc)).to(y.dtype)
