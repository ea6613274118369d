"""The TransMamba mixer core in plain PyTorch: forward, prefill into a cache, one decoding step.

DESIGN section 1 (arXiv 2503.24067 section 2): ``in_proj`` gives [z | x B C | dt]; a causal
conv + SiLU runs over xBC; dt = clamp(softplus(dt + dt_bias), dt_limit), A = -exp(A_log);
tokens t < p take causal softmax attention with Q = C, K = B (RoPE on both when enabled),
V = x; the Memory Converter turns the prefix's un-rotated K, V and dt into the exact SSM state
after token p - 1 and the SSM runs on from it for t >= p; a grouped RMSNorm (gated by SiLU(z)
from p on) finishes. ``in_proj`` and ``out_proj`` stay with the caller (megatron's parallel
linears or ``nn.Linear``): these functions start from the projection ``[B, L, width]`` and
return the normed ``[B, L, H*P]`` that ``out_proj`` reads.

Decoding (``MixerCache``): ``mixer_forward`` with a cache is the prefill, one pass over the
prompt that also leaves the conv state and either the prefix's keys, values and dt (a prompt
shorter than p) or the SSM state (the Memory Converter's at L = p, the scan's final one at
L > p). ``mixer_step`` takes one token: attention over the cached prefix while t < p, and after
the token at p - 1 the Memory Converter's state replaces the keys, values and dt for good (so
the layer's memory and per-token cost stop growing); from p on, one SSM recurrence step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .attention import grouped_attention
from .cache import MixerCache, compute_dtype
from .conv import causal_conv1d_silu_naive, causal_conv1d_silu_step_naive, causal_conv_state
from .memory_converter import memory_converter
from .norm import gated_rmsnorm_naive
from .rope import apply_rope, rope_angles, rope_table
from .ssd import _discretize_dt, chunk_ssd_naive, ssd_step_naive

RotaryFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class MixerShape:
    """A mixer's sizes and settings: H heads of dim P, G Q/K groups of state dim N, conv width
    W, SSD chunk, TransPoint p, norm eps, dt clamp, RoPE base (None: no RoPE)."""

    heads: int
    head_dim: int
    groups: int
    state_dim: int
    conv_kernel: int
    chunk_size: int
    transpoint: int
    eps: float
    dt_limit: tuple = (0.0, math.inf)
    rope_theta: Optional[float] = None

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def conv_channels(self) -> int:
        return self.inner + 2 * self.groups * self.state_dim

    @property
    def softmax_scale(self) -> float:
        return 1.0 / math.sqrt(self.state_dim)


class MixerWeights(NamedTuple):
    """conv_weight [channels, 1, W], conv_bias [channels], dt_bias / A_log / D [H],
    norm_weight [H*P]."""

    conv_weight: Tensor
    conv_bias: Tensor
    dt_bias: Tensor
    A_log: Tensor
    D: Tensor
    norm_weight: Tensor


def processed_dt(dt: Tensor, dt_bias: Tensor, A_log: Tensor, dt_limit, acc: torch.dtype):
    """DESIGN step 4: dt = clamp(softplus(dt + dt_bias), dt_limit), A = -exp(A_log), in acc
    (the SSD scan's own dt processing, done once before the segments share dt)."""
    return _discretize_dt(dt.to(acc), dt_bias.to(acc), True, dt_limit), -torch.exp(A_log.to(acc))


def prefix_attention(x: Tensor, B: Tensor, C: Tensor, p: int, softmax_scale: float,
                     rotary: Optional[RotaryFn]) -> Tensor:
    """Attention segment: Q = C, K = B (rotated when RoPE is on), V = x over tokens [0, p)."""
    q, k = C[:, :p], B[:, :p]
    if rotary is not None:
        q, k = rotary(q), rotary(k)
    return grouped_attention(q, k, x[:, :p], softmax_scale)


def transmamba_core(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                    transpoint: int, chunk_size: int, softmax_scale: float,
                    rotary: Optional[RotaryFn] = None, return_final_state: bool = False):
    """Mixer core output before the gated norm.

    Args:
        x: [B, T, H, P] (= V); dt: [B, T, H] processed; A: [H] negative; B: [B, T, G, N]
        (= K); C: [B, T, G, N] (= Q); D: [H] skip. transpoint: p (clamped to [0, T]).
        rotary: applies RoPE to a [B, p, G, N] tensor at positions 0..p-1 (attention only).
        return_final_state: also return the SSM state after token T - 1 (the scan's, or the
            Memory Converter's when T <= p).

    Returns:
        y [B, T, H, P] in x's dtype: attention output for t < p, SSM output (with the D skip,
        without the z gate) for t >= p; with ``return_final_state`` (y, state [B, H, P, N]).
    """
    seq_len = x.shape[1]
    p = max(0, min(int(transpoint), seq_len))
    parts, state = [], None
    if p > 0:
        parts.append(prefix_attention(x, B, C, p, softmax_scale, rotary))
        if p < seq_len or return_final_state:
            state = memory_converter(B[:, :p], x[:, :p], dt[:, :p], A)
    if p < seq_len:
        y = chunk_ssd_naive(x[:, p:], dt[:, p:], A, B[:, p:], C[:, p:], chunk_size, D=D,
                            initial_states=state, return_final_states=return_final_state)
        if return_final_state:
            y, state = y
        parts.append(y.to(x.dtype))
    y = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return (y, state) if return_final_state else y


def allocate_mixer_cache(shape: MixerShape, batch_size: int, max_seqlen: int,
                         dtype: torch.dtype, device=None) -> MixerCache:
    """Zero conv and SSM states, and prefix buffers for min(p, max_seqlen) tokens (none at
    p = 0). Zero states are the start of a sequence: a step from this cache is token 0."""
    acc = compute_dtype(dtype)
    cache = MixerCache(
        conv_state=torch.zeros(batch_size, shape.conv_channels, shape.conv_kernel - 1,
                               dtype=dtype, device=device),
        ssm_state=torch.zeros(batch_size, shape.heads, shape.head_dim, shape.state_dim,
                              dtype=acc, device=device))
    if shape.transpoint > 0:
        rows = max(1, min(shape.transpoint, max_seqlen))
        cache.keys = torch.zeros(batch_size, rows, shape.groups, shape.state_dim, dtype=dtype,
                                 device=device)
        cache.values = torch.zeros(batch_size, rows, shape.heads, shape.head_dim, dtype=dtype,
                                   device=device)
        cache.dts = torch.zeros(batch_size, rows, shape.heads, dtype=acc, device=device)
    return cache


def _split(shape: MixerShape, projected: Tensor):
    """[..., width] -> z [..., H*P], xBC [..., channels], dt [..., H]."""
    return torch.split(projected, [shape.inner, shape.conv_channels, shape.heads], dim=-1)


def _heads(shape: MixerShape, xBC: Tensor):
    """xBC [..., channels] -> x [..., H, P], B [..., G, N], C [..., G, N] (views)."""
    GN = shape.groups * shape.state_dim
    x, B, C = torch.split(xBC, [shape.inner, GN, GN], dim=-1)
    lead = xBC.shape[:-1]
    return (x.reshape(*lead, shape.heads, shape.head_dim),
            B.reshape(*lead, shape.groups, shape.state_dim),
            C.reshape(*lead, shape.groups, shape.state_dim))


def mixer_forward(projected: Tensor, shape: MixerShape, weights: MixerWeights,
                  cache: Optional[MixerCache] = None,
                  rotary: Optional[RotaryFn] = None) -> Tensor:
    """The mixer from in_proj's output ``projected`` [B, L, width] to the normed [B, L, H*P].

    With ``cache`` (empty: ``length`` 0) this is the prefill: the same computation, which also
    leaves the cache ready for ``mixer_step`` at position L. ``rotary`` replaces the RoPE of
    positions 0..L-1 (default: ``apply_rope`` on ``rope_table``; the model passes its cached
    one)."""
    if cache is not None and cache.length:
        raise ValueError(f"mixer_forward: the cache already holds {cache.length} tokens; "
                         "continue with mixer_step")
    batch, seq_len, _ = projected.shape
    z, xBC, dt = _split(shape, projected)
    conv_input = xBC
    xBC = causal_conv1d_silu_naive(xBC, weights.conv_weight, weights.conv_bias)  # [B, L, ch]
    x, B, C = _heads(shape, xBC)
    acc = compute_dtype(x.dtype)
    dt, A = processed_dt(dt, weights.dt_bias, weights.A_log, shape.dt_limit, acc)
    if rotary is None and shape.rope_theta is not None:
        table = rope_table(min(seq_len, shape.transpoint), shape.state_dim, shape.rope_theta,
                           x.device)
        rotary = partial(apply_rope, table=table)
    p = shape.transpoint
    need_state = cache is not None and seq_len >= p
    y = transmamba_core(x, dt, A, B, C, weights.D.to(acc), p, shape.chunk_size,
                        shape.softmax_scale, rotary, return_final_state=need_state)
    if need_state:
        y, state = y
    if cache is not None:
        cache.conv_state.copy_(causal_conv_state(conv_input, shape.conv_kernel))
        if need_state:
            cache.ssm_state.copy_(state)
            cache.release_prefix()
        else:
            cache.append_prefix(B, x, dt)
        cache.length = seq_len
    return gated_rmsnorm_naive(y.reshape(batch, seq_len, shape.inner), z, weights.norm_weight,
                               shape.groups, shape.eps, p)


def mixer_step(projected: Tensor, shape: MixerShape, weights: MixerWeights,
               cache: MixerCache) -> Tensor:
    """One token: in_proj's output ``projected`` [B, width] at position t = ``cache.length``
    -> the normed [B, H*P]; the cache moves on to t + 1."""
    t = cache.length
    z, xBC, dt = _split(shape, projected)
    xBC, conv_state = causal_conv1d_silu_step_naive(xBC, cache.conv_state, weights.conv_weight,
                                                    weights.conv_bias)
    cache.conv_state.copy_(conv_state)
    x, B, C = _heads(shape, xBC)                          # [B, H, P], [B, G, N], [B, G, N]
    acc = compute_dtype(x.dtype)
    dt, A = processed_dt(dt, weights.dt_bias, weights.A_log, shape.dt_limit, acc)  # [B, H]
    p = shape.transpoint
    if t < p:                                              # attention over the cached prefix
        cache.append_prefix(B[:, None], x[:, None], dt[:, None])
        keys, values, dts = (b[:, :t + 1] for b in (cache.keys, cache.values, cache.dts))
        q, k = C[:, None], keys
        if shape.rope_theta is not None:
            positions = torch.arange(t + 1, device=x.device)
            q = apply_rope(q, rope_angles(positions[t:], shape.state_dim, shape.rope_theta))
            k = apply_rope(k, rope_angles(positions, shape.state_dim, shape.rope_theta))
        y = grouped_attention(q, k, values, shape.softmax_scale)[:, 0]            # [B, H, P]
        if t + 1 == p:     # the Memory Converter's exact state; the prefix is released for good
            cache.ssm_state.copy_(memory_converter(keys, values, dts, A))
            cache.release_prefix()
    else:
        y, state = ssd_step_naive(cache.ssm_state, x, dt, A, B, C, weights.D.to(acc))
        cache.ssm_state.copy_(state)
    cache.length = t + 1
    positions = torch.full((y.shape[0], 1), t, device=y.device)
    return gated_rmsnorm_naive(y.reshape(y.shape[0], 1, shape.inner), z[:, None],
                               weights.norm_weight, shape.groups, shape.eps, p,
                               position_ids=positions)[:, 0]
