"""Causal softmax attention: the TransMamba mixer's attention segment and the ``*`` layers.

DESIGN section 1, step 5: with Q = C, K = B, V = x, tokens before the TransPoint take
``y_t = sum_{s<=t} softmax_s(q_t . k_s / sqrt(N)) v_s``; one Q/K group serves H/G value heads
(the inverse of grouped-query attention), so a group's value heads are attended as one wide
value. ``*`` layers are ordinary grouped-query attention. Queries may be the last Tq of Tk
positions (decoding over a KV cache). PyTorch SDPA computes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .cache import AttentionCache


def causal_attention(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float) -> Tensor:
    """Causal attention of queries at the last Tq of the keys' Tk positions.

    Args:
        q: [B, Tq, Hq, d]; k: [B, Tk, Hk, d]; v: [B, Tk, Hk, dv], Tq <= Tk, Hq % Hk == 0 (key
            head j serves query heads j Hq/Hk .. (j+1) Hq/Hk - 1).

    Returns:
        [B, Tq, Hq, dv].
    """
    tq, tk = q.shape[1], k.shape[1]
    mask, causal = None, tq == tk
    if 1 < tq < tk:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        is_causal=causal and tq > 1, scale=softmax_scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float) -> Tensor:
    """The mixer's attention: each Q/K group serves H/G value heads.

    Args:
        q: [B, Tq, G, N] (C, rotated when RoPE is on) at the last Tq of Tk positions;
        k: [B, Tk, G, N] (B, rotated likewise); v: [B, Tk, H, P] (x).

    Returns:
        [B, Tq, H, P].
    """
    batch, tk, heads, head_dim = v.shape
    groups = q.shape[2]
    wide = v.reshape(batch, tk, groups, (heads // groups) * head_dim)   # the softmax is shared
    out = causal_attention(q, k, wide, softmax_scale)                     # [B, Tq, G, H/G * P]
    return out.reshape(batch, q.shape[1], heads, head_dim)


def cached_attention(q: Tensor, k: Tensor, v: Tensor, cache: AttentionCache,
                     softmax_scale: float) -> Tensor:
    """A ``*`` layer over its KV cache: appends k, v [B, n, groups, dim] (rotated) and attends
    q [B, n, heads, dim] (the n newest positions) over every cached key. [B, n, heads, dim]."""
    keys, values = cache.append(k, v)
    return causal_attention(q, keys, values, softmax_scale)
