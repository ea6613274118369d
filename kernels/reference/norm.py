"""RMSNorms of the model: the specifications of the fused kernels, and the one PyTorch form
the model's torch path, decoding and the exported Hugging Face model run.

TransMamba's output norm (DESIGN section 1, step 6): tokens t >= p (SSM) are gated first,
o = RMSNorm_G(y * SiLU(z)) * w (Mamba-2's norm_before_gate=False); tokens t < p (attention,
the paper's "attention w/o z") are normalised without the gate. RMSNorm_G normalises each of
G groups of C/G channels on its own, so the norm stays local to a tensor-parallel rank. With
packed documents t is the position inside the token's document (``position_ids``). The
pre-norms are plain RMSNorms, y = x / sqrt(mean(x^2) + eps) * w, optionally after adding the
residual stream (``add_rmsnorm_naive``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gated_rmsnorm_naive(y: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float,
                        transpoint: int, position_ids: Optional[Tensor] = None,
                        y_prefix: Optional[Tensor] = None) -> Tensor:
    """y, z: [B, T, C]; weight: [C]; position_ids: [B, T] integer position of each token (in
    its document), None for 0..T-1 in every row. Tokens at positions >= transpoint are gated.
    y_prefix: [B, p, G, C/G], p <= T (the attention rows, not packed): rows t < p are read
    from it instead of y. Returns [B, T, C] in y's dtype (float32 math, float64 for float64
    inputs)."""
    acc = _acc(y.dtype)
    h = y.to(acc)
    if y_prefix is not None:
        if position_ids is not None:
            raise ValueError("y_prefix is for the unpacked layout only (no position_ids)")
        p = y_prefix.shape[1]
        if y_prefix.shape != (y.shape[0], p, groups, y.shape[-1] // groups) or p > y.shape[1]:
            raise ValueError(f"y_prefix must be [B, p <= T, G, C/G] for y {tuple(y.shape)} and "
                             f"G={groups}, got {tuple(y_prefix.shape)}")
        h = torch.cat([y_prefix.reshape(y.shape[0], p, y.shape[-1]).to(acc), h[:, p:]], dim=1)
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


def rmsnorm_naive(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x: [..., C]; weight: [C] -> x / sqrt(mean(x^2) + eps) * weight in x's dtype (float32
    math, float64 for float64 inputs)."""
    acc = _acc(x.dtype)
    h = x.to(acc)
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)).to(x.dtype)


def add_rmsnorm_naive(x: Tensor, residual: Optional[Tensor], weight: Tensor,
                      eps: float) -> tuple[Tensor, Tensor]:
    """x, residual: [..., C] (residual may be None); weight: [C] -> (normed, summed).

    summed = x + residual, rounded to residual's dtype (x itself without a residual); normed =
    rmsnorm_naive(summed) * weight in x's dtype: the pre-norm of a block that also carries the
    residual stream on."""
    if residual is None:
        return rmsnorm_naive(x, weight, eps), x
    acc = _acc(residual.dtype)
    summed = (x.to(acc) + residual.to(acc)).to(residual.dtype)
    h = summed.to(acc)
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)
    return normed.to(x.dtype), summed
