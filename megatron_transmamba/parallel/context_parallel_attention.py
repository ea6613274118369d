"""Context-parallel (CP) attention prefix of a TransMamba layer: the distributed form of
``prefix_attention``.

Rank r of the CP group holds tokens [r S, (r + 1) S). Tokens t < p (the TransPoint) take causal
grouped softmax attention ``y_t = sum_{s <= t} softmax_s(q_t . k_s * scale) v_s`` with
Q = C, K = B (both rotated by RoPE at their GLOBAL positions when it is on) and V = x, one Q/K
group serving H/G value heads (DESIGN.md section 1, step 5). Queries stay local: rank r owns
L_r = clamp(p - r S, 0, S) query rows; their keys 0..r S + i live on ranks 0..r, so every rank
all-gathers the rotated K and V of its first W = min(S, p) rows (rows >= p zero-padded) in ONE
autograd all-gather (``_AllGatherRows``, whose backward hands every rank the sum of all
ranks' gradients of its rows, so dK and dV reach the earlier ranks), keeps
keys [0, p) and applies the causal mask shifted by r S (query r S + i sees keys 0..r S + i).
Bytes moved per layer per rank, forward: the all-gather receives (R - 1) x W x B x (G N + H P)
elements (float32 / bf16 / float64 as the inputs), nothing when p = 0; the backward moves the
same amount once more (a reduce-scatter; on gloo an all-reduce, about twice that). Load
imbalance: the attention FLOPs of rank r are about (min(p, (r + 1) S)^2 - (r S)^2) / 2
rows x keys, so ranks past p are idle in attention while the last rank below p is the busiest.
With the V9 schedule (p = 0, T/64, ..., T/2, T cyclic) at CP = 4 only the p = T/2 and p = T
layers reach ranks 1-3 (ranks 2-3 only the p = T one);
per 8 layers ranks 0..3 do roughly 3.3, 6, 5, 7 units of S^2 / 2, i.e. the busiest rank does
~1.3x the mean (the SSM suffix, which is the complement, partly evens this out across the
layer). Not done: packed documents (``cu_seqlens`` / per-document TransPoints), the
Triton / flash path (this uses ``F.scaled_dot_product_attention`` with an explicit boolean
mask), a ring (send/recv of K/V blocks overlapped with compute, and skipping the ranks past p)
instead of the all-gather, and the wiring into the mixer and the parallel state.
"""
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megatron_transmamba.layers.mixer_core import prefix_attention
from megatron_transmamba.layers.rotary import apply_rope
from megatron_transmamba.parallel.cp_collectives import all_gather_rows

__all__ = ["context_parallel_prefix_attention"]


def _gather_keys_values(k: Tensor, v: Tensor, width: int, p: int, cp_group) -> tuple[Tensor, Tensor]:
    """All-gather every rank's rotated keys k [B, L_r, G, N] and values v [B, L_r, H, P]
    (L_r <= width rows, padded to ``width``) in one autograd collective; returns the keys
    [B, p, G, N] and values [B, p, H, P] of global tokens [0, p)."""
    batch, rows, groups, state_dim = k.shape
    heads, head_dim = v.shape[2:]
    packed = torch.cat([k.reshape(batch, rows, groups * state_dim),
                        v.reshape(batch, rows, heads * head_dim)], dim=-1)
    packed = F.pad(packed, (0, 0, 0, width - rows)).contiguous()      # [B, W, G N + H P]
    gathered = all_gather_rows(packed, cp_group)                 # [B, R W, .]
    # With W = S the rows are the global tokens in order; with W = p < S only rank 0's rows
    # come before p and they come first.
    keys = gathered[:, :p, :groups * state_dim].reshape(batch, p, groups, state_dim)
    values = gathered[:, :p, groups * state_dim:].reshape(batch, p, heads, head_dim)
    return keys, values


def context_parallel_prefix_attention(x: Tensor, B: Tensor, C: Tensor, p: int, softmax_scale: float,
                                      rope_table: Optional[Tensor] = None,
                                      cp_group=None) -> Tensor:
    """Attention rows of this CP shard's tokens that lie before the TransPoint.

    Args:
        x: [B, S, H, P] this rank's shard (global tokens [r S, (r + 1) S), S equal on all ranks).
        B, C: [B, S, G, N] with G dividing H (K = B, Q = C).
        p: the TransPoint, 0 <= p <= R S, the same on every rank.
        softmax_scale: the softmax temperature (1 / sqrt(N) in the mixer).
        rope_table: [>= R S, 1, 1, N] angles for GLOBAL positions (``rope_table``), or None.
        cp_group: the CP process group, ranks in sequence order; None or size 1 runs the plain
            ``prefix_attention``.

    Returns:
        y_prefix [B, L_r, H, P], L_r = clamp(p - r S, 0, S): the rows of the full-sequence
        ``prefix_attention`` for this rank's tokens (empty on ranks past p). Every rank must call
        this (the all-gather is collective) and, when training, run the backward through its
        output even when it is empty (the all-gather's backward is collective too).
    """
    if cp_group is None or dist.get_world_size(group=cp_group) == 1:
        rotary = None if rope_table is None else partial(apply_rope, table=rope_table)
        return prefix_attention(x, B, C, p, softmax_scale, rotary)
    world, rank = dist.get_world_size(group=cp_group), dist.get_rank(group=cp_group)
    batch, shard, heads, head_dim = x.shape
    if not 0 <= p <= world * shard:
        raise ValueError(f"TransPoint {p} outside [0, {world * shard}] (CP = {world}, S = {shard})")
    if p == 0:  # no rank has prefix tokens; p is the same everywhere, so no collective is skipped
        return x[:, :0]
    start = rank * shard
    rows = min(shard, max(0, p - start))                                   # L_r
    width = min(shard, p)                                                  # W
    k, q = B[:, :rows], C[:, :rows]
    if rope_table is not None:
        table = rope_table[start:]                                         # global positions
        k, q = apply_rope(k, table), apply_rope(q, table)
    keys, values = _gather_keys_values(k, x[:, :rows], width, p, cp_group)
    if rows == 0:  # keep the output on the all-gather's graph so this rank joins its backward
        return values[:, :0]
    groups = k.shape[2]
    visible = (torch.arange(p, device=x.device)[None, :]
               <= torch.arange(start, start + rows, device=x.device)[:, None])  # [L_r, p]
    v_grouped = values.reshape(batch, p, groups, (heads // groups) * head_dim)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys.transpose(1, 2), v_grouped.transpose(1, 2),
        attn_mask=visible, scale=softmax_scale)                            # [B, G, L_r, H/G P]
    return out.transpose(1, 2).reshape(batch, rows, heads, head_dim)
