"""Causal depthwise conv1d + bias + SiLU over [B, T, C]: the specification of the fused kernel.

Mamba-2's short convolution over x, B, C (DESIGN section 1, step 2): out[t, c] =
SiLU(bias[c] + sum_{j<W} weight[c, 0, j] * in[t - (W-1) + j, c]), zero before the sequence.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def causal_conv1d_silu_naive(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x: [B, T, C]; weight: [C, 1, W] (nn.Conv1d depthwise layout); bias: [C] -> [B, T, C]."""
    channels, width = weight.shape[0], weight.shape[-1]
    out = F.conv1d(x.transpose(1, 2), weight, bias, padding=width - 1, groups=channels)
    return F.silu(out[..., : x.shape[1]]).transpose(1, 2)
