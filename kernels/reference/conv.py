"""Causal depthwise conv1d + bias + SiLU over [B, T, C]: the specification of the fused kernel.

Mamba-2's short convolution over x, B, C (DESIGN section 1, step 2): out[t, c] =
SiLU(bias[c] + sum_{j<W} weight[c, 0, j] * in[t - (W-1) + j, c]), zero before the sequence.
With packed documents (``seq_idx`` [B, T], the document of each token, as in mamba_ssm's
``causal_conv1d_fn``) a tap reads zero unless its token is in the same document as t, so each
document is convolved as if it were alone. Decoding keeps the last W-1 inputs (the conv state,
``causal_conv_state``) and convolves one token at a time (``causal_conv1d_silu_step_naive``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_conv1d_silu_naive(x: Tensor, weight: Tensor, bias: Tensor,
                             seq_idx: Optional[Tensor] = None) -> Tensor:
    """x: [B, T, C]; weight: [C, 1, W] (nn.Conv1d depthwise layout); bias: [C];
    seq_idx: [B, T] integer document index, non-decreasing along T -> [B, T, C]."""
    channels, width = weight.shape[0], weight.shape[-1]
    if seq_idx is None:
        out = F.conv1d(x.transpose(1, 2), weight, bias, padding=width - 1, groups=channels)
        return F.silu(out[..., : x.shape[1]]).transpose(1, 2)
    if seq_idx.shape != x.shape[:2]:
        raise ValueError(f"seq_idx must be [B, T] = {list(x.shape[:2])}, got {tuple(seq_idx.shape)}")
    windows = F.pad(x, (0, 0, width - 1, 0)).unfold(1, width, 1)              # [B, T, C, W]
    # tap j of token t reads token t - (W-1) + j: keep it only inside t's document
    padded_idx = F.pad(seq_idx, (width - 1, 0), value=-1).unfold(1, width, 1)  # [B, T, W]
    same = (padded_idx == seq_idx[..., None]).to(x.dtype)
    out = torch.einsum("btcw,cw,btw->btc", windows, weight[:, 0].to(x.dtype), same) + bias
    return F.silu(out)


def causal_conv_state(x: Tensor, width: int) -> Tensor:
    """The conv state after x [B, T, C]: its last W-1 inputs as [B, C, W-1], zeros before the
    sequence (T < W-1), which is what ``causal_conv1d_silu_step_naive`` reads next."""
    keep = width - 1
    padded = F.pad(x.transpose(1, 2), (max(0, keep - x.shape[1]), 0))        # [B, C, >= W-1]
    return padded[..., padded.shape[-1] - keep:]


def causal_conv1d_silu_step_naive(x: Tensor, conv_state: Tensor, weight: Tensor,
                                  bias: Tensor) -> tuple[Tensor, Tensor]:
    """One token of ``causal_conv1d_silu_naive``: x [B, C] after the inputs in ``conv_state``
    [B, C, W-1] (oldest first). Returns (out [B, C], the new conv state [B, C, W-1])."""
    window = torch.cat([conv_state, x[..., None]], dim=-1)                    # [B, C, W]
    out = (window * weight[:, 0].to(x.dtype)).sum(-1) + bias
    return F.silu(out), window[..., 1:]
