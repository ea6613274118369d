"""The TransMamba mixer core: attention on [0, p), the Memory Converter, SSD on [p, T).

DESIGN section 1, step 5 (arXiv 2503.24067 section 2): with Q = C, K = B, V = x from the
shared projection, tokens before the TransPoint p take causal softmax attention (one Q/K group
serves H/G value heads), the Memory Converter turns the prefix's K, V and dt into the SSM state
after token p-1, and the SSM continues from that state for tokens [p, T). The ``torch`` backend
here is the executable specification: PyTorch SDPA for attention and the chunked SSD scan of
``transmamba_kernels.ssd.naive``; faster backends must match it. ``BACKENDS`` maps each
``mixer_backend`` to its conv, core and gated grouped RMSNorm (``transmamba_kernels``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_transmamba.layers.memory_converter import memory_converter
from transmamba_kernels.conv.naive import causal_conv1d_silu_naive
from transmamba_kernels.norm.naive import gated_rmsnorm_naive
from transmamba_kernels.ssd.naive import chunk_ssd_naive

RotaryFn = Callable[[Tensor], Tensor]


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float) -> Tensor:
    """Causal softmax attention where each Q/K group serves H/G value heads.

    Args:
        q, k: [B, p, G, N]; v: [B, p, H, P].

    Returns:
        [B, p, H, P].
    """
    batch, p, heads, head_dim = v.shape
    groups = q.shape[2]
    # The softmax matrix is shared by the group, so the group's value heads are one wide value.
    v_grouped = v.reshape(batch, p, groups, (heads // groups) * head_dim)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v_grouped.transpose(1, 2),
        is_causal=True, scale=softmax_scale)                                     # [B, G, p, H/G*P]
    return out.transpose(1, 2).reshape(batch, p, heads, head_dim)


def prefix_attention(x: Tensor, B: Tensor, C: Tensor, p: int, softmax_scale: float,
                     rotary: Optional[RotaryFn]) -> Tensor:
    """Attention segment: Q = C, K = B (rotated when RoPE is on), V = x over tokens [0, p)."""
    q, k = C[:, :p], B[:, :p]
    if rotary is not None:
        q, k = rotary(q), rotary(k)
    return grouped_attention(q, k, x[:, :p], softmax_scale)


def transmamba_core_torch(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                          transpoint: int, chunk_size: int, softmax_scale: float,
                          rotary: Optional[RotaryFn] = None) -> Tensor:
    """Mixer core output before the gated norm.

    Args:
        x: [B, T, H, P] (= V); dt: [B, T, H] after softplus and clamping; A: [H] negative;
        B: [B, T, G, N] (= K); C: [B, T, G, N] (= Q); D: [H] skip.
        transpoint: p in [0, T] (larger values are clamped to T).
        rotary: applies RoPE to a [B, p, G, N] tensor at positions 0..p-1 (attention only).

    Returns:
        y: [B, T, H, P] in x's dtype: attention output for t < p, SSM output (with the D skip,
        without the z gate) for t >= p.
    """
    seq_len = x.shape[1]
    p = max(0, min(int(transpoint), seq_len))
    parts = []
    initial_state = None
    if p > 0:
        parts.append(prefix_attention(x, B, C, p, softmax_scale, rotary))
        if p < seq_len:
            initial_state = memory_converter(B[:, :p], x[:, :p], dt[:, :p], A)
    if p < seq_len:
        y_ssm = chunk_ssd_naive(x[:, p:], dt[:, p:], A, B[:, p:], C[:, p:], chunk_size, D=D,
                                initial_states=initial_state)
        parts.append(y_ssm.to(x.dtype))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def transmamba_core_triton(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                           transpoint: int, chunk_size: int, softmax_scale: float,
                           rotary: Optional[RotaryFn] = None) -> Tensor:
    """Same as ``transmamba_core_torch``; the SSM runs in the Triton SSD over the whole sequence
    with outputs only from p on, so the Memory Converter is fused into its state passing."""
    from transmamba_kernels.ssd.chunk import chunk_ssd_triton

    seq_len = x.shape[1]
    p = max(0, min(int(transpoint), seq_len))
    y = chunk_ssd_triton(x, dt, A, B, C, chunk_size, D=D, transpoint=p) if p < seq_len else None
    if p == 0:
        return y
    attention = prefix_attention(x, B, C, p, softmax_scale, rotary)
    return attention if y is None else torch.cat([attention, y[:, p:]], dim=1)


def gated_rmsnorm_triton(*args):
    from transmamba_kernels.norm.gated_rmsnorm import gated_rmsnorm_triton as fused
    return fused(*args)


def causal_conv1d_silu_triton(*args):
    from transmamba_kernels.conv.causal_conv import causal_conv1d_silu_triton as fused
    return fused(*args)


# backend -> (causal conv + SiLU, core, gated grouped RMSNorm); every entry has the signature
# of its torch counterpart
BACKENDS = {
    "torch": (causal_conv1d_silu_naive, transmamba_core_torch, gated_rmsnorm_naive),
    "triton": (causal_conv1d_silu_triton, transmamba_core_triton, gated_rmsnorm_triton),
}
