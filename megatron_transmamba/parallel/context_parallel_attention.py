"""Context-parallel (CP) causal softmax attention: the ``*`` layers and the TransMamba prefix.

Rank r of the CP group holds global tokens [r S, (r + 1) S). ``context_parallel_causal_attention``
is the one implementation of causal attention ``y_t = sum_{s <= t} softmax_s(q_t . k_s * scale)
v_s`` over keys [0, p) for this rank's queries (q, k rotated at their GLOBAL positions): a ``*``
layer (megatron-core SelfAttention, GQA) is p = T; the TransMamba prefix (DESIGN.md section 1,
step 5: Q = C, K = B, V = x, one Q/K group serving H/G value heads) is
``context_parallel_prefix_attention``, the same call with the group's H/G heads of x as one wide
value. Rank r owns L_r = clamp(p - r S, 0, S) query rows; their keys 0..r S + i live on ranks
0..r, so every rank all-gathers the K and V of its first W = min(S, p) rows (rows >= p
zero-padded) in ONE autograd all-gather (``cp_collectives.all_gather_rows``, whose backward
hands every rank the sum of all ranks' gradients of its rows, so dK and dV reach the earlier
ranks) and attends over keys [0, r S + L_r) with the lower-right-aligned causal mask (query
r S + i sees keys 0..r S + i): ``causal_lower_right``, which SDPA runs without materialising a
mask where a flash / memory-efficient kernel takes it (CUDA), and as a boolean mask otherwise.
Bytes per layer per rank, forward: the all-gather receives (R - 1) x W x B x hk (d + dv)
elements in the inputs' dtype (a ``*`` layer: (R - 1) / R of the whole sequence's K and V;
nothing when p = 0), and the gathered [B, R W, hk (d + dv)] buffer stays alive for the backward
(R times the local K and V); the backward moves the same amount once more (a reduce-scatter; on
gloo an all-reduce, about twice that). Load imbalance: rank r scores about
(min(p, (r + 1) S)^2 - (r S)^2) / 2 query-key pairs, so with p = T rank r does (2 r + 1) S^2 / 2
and the last rank about (2 R - 1) / R ~ 2x the mean; ranks past p are idle. megatron-core's
zigzag split (rank r holds chunks r and 2R - 1 - r of 2R) would balance a ``*`` layer, but the
SSM state passing of the T / M layers needs contiguous shards (rank r's scan starts from rank
r - 1's final state) and the residual stream keeps one layout for every layer, so shards stay
contiguous. With the V9 TransPoint schedule at CP = 4 the TransMamba prefix does per 8 layers
roughly 3.3, 6, 5, 7 units of S^2 / 2 on ranks 0..3 (~1.3x the mean; the SSM suffix, the
complement, partly evens this out). Packed documents take ``context_parallel_documents``. Not
done: a ring (send/recv of K/V blocks overlapped with compute, skipping ranks past p) instead of
the all-gather, attention dropout.
"""
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from megatron_transmamba.layers.mixer_core import prefix_attention
from megatron_transmamba.layers.rotary import apply_rope
from megatron_transmamba.parallel.cp_collectives import all_gather_rows

__all__ = ["context_parallel_causal_attention", "context_parallel_prefix_attention"]


def _gather_keys_values(k: Tensor, v: Tensor, width: int, cp_group) -> tuple[Tensor, Tensor]:
    """All-gather every rank's keys k [B, L, hk, d] and values v [B, L, hk, dv] (L <= width
    rows, zero-padded to ``width``) in one autograd collective; returns keys [B, R W, hk, d] and
    values [B, R W, hk, dv], rank r's rows at r W (views of one buffer)."""
    batch, rows, heads, key_dim = k.shape
    value_dim = v.shape[3]
    packed = torch.cat([k.reshape(batch, rows, heads * key_dim),
                        v.reshape(batch, rows, heads * value_dim)], dim=-1)  # [B, L, hk (d + dv)]
    packed = F.pad(packed, (0, 0, 0, width - rows)).contiguous()          # [B, W, .]
    gathered = all_gather_rows(packed, cp_group)                          # [B, R W, .]
    total = gathered.shape[1]
    keys = gathered[..., :heads * key_dim].reshape(batch, total, heads, key_dim)
    values = gathered[..., heads * key_dim:].reshape(batch, total, heads, value_dim)
    return keys, values


def context_parallel_causal_attention(q: Tensor, k: Tensor, v: Tensor, p: int, softmax_scale: float,
                                      cp_group=None, shard_len: Optional[int] = None) -> Tensor:
    """Causal attention over keys [0, p) for the queries of this CP shard.

    Args:
        q: [B, L, hq, d], k: [B, L, hk, d], v: [B, L, hk, dv]: the first L rows of this rank's
            shard (global tokens [r S, r S + L)), q and k rotated at their global positions;
            hq a multiple of hk (grouped-query attention). L >= L_r: rows from L_r on are not
            read, so a caller may pass only the rows before p.
        p: keys [0, p) take part, 0 <= p <= R S, the same on every rank (R S for full causal
            attention).
        softmax_scale: the softmax temperature.
        cp_group: the CP process group, ranks in sequence order; None or size 1: one process.
        shard_len: S, the tokens per rank (default L: the whole shard was passed).

    Returns:
        [B, L_r, hq, dv], L_r = clamp(p - r S, 0, S): the rows of full-sequence causal attention
        for this rank's tokens before p (empty on ranks past p). Every rank must call this (the
        all-gather is collective) and, when training, run the backward through its output even
        when it is empty (the all-gather's backward is collective too).
    """
    world = 1 if cp_group is None else dist.get_world_size(group=cp_group)
    rank = 0 if world == 1 else dist.get_rank(group=cp_group)
    batch, given, q_heads, _ = q.shape
    kv_heads, value_dim = v.shape[2:]
    shard = given if shard_len is None else shard_len
    if not 0 <= p <= world * shard:
        raise ValueError(f"p = {p} outside [0, {world * shard}] (CP = {world}, S = {shard})")
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads are not a multiple of {kv_heads} key/value heads")
    start = rank * shard
    rows = min(shard, max(0, p - start))                                   # L_r
    if given < rows:
        raise ValueError(f"rank {rank} owns {rows} query rows before p = {p} but got {given}")
    if p == 0:  # no rank has queries; p is the same everywhere, so no collective is skipped
        return v[:, :0, :1].expand(batch, 0, q_heads, value_dim)
    keys_end = start + rows if rows else 0               # query r S + i sees keys 0..r S + i
    if world == 1:
        keys, values = k[:, :keys_end], v[:, :keys_end]
    else:
        # With W = S the gathered rows are the global tokens in order; with W = p < S only
        # rank 0 has rows, and they come first.
        keys, values = _gather_keys_values(k[:, :rows], v[:, :rows], min(shard, p), cp_group)
        keys, values = keys[:, :keys_end], values[:, :keys_end]
    if rows == 0:  # keep the output on the all-gather's graph so this rank joins its backward
        return values[:, :, :1].expand(batch, 0, q_heads, value_dim)
    out = F.scaled_dot_product_attention(
        q[:, :rows].transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=causal_lower_right(rows, keys_end), scale=softmax_scale,
        enable_gqa=q_heads != kv_heads)                                    # [B, hq, L_r, dv]
    return out.transpose(1, 2)


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
    batch, shard, heads, head_dim = x.shape
    groups = B.shape[2]
    if p == 0:
        return x[:, :0]
    start = dist.get_rank(group=cp_group) * shard
    rows = min(shard, max(0, p - start))              # only these rows are rotated and sent
    k, q = B[:, :rows], C[:, :rows]
    if rope_table is not None:
        table = rope_table[start:]                                         # global positions
        k, q = apply_rope(k, table), apply_rope(q, table)
    v = x[:, :rows].reshape(batch, rows, groups, (heads // groups) * head_dim)  # one wide value
    y = context_parallel_causal_attention(q, k, v, p, softmax_scale, cp_group, shard_len=shard)
    return y.reshape(batch, rows, heads, head_dim)                         # [B, L_r, H, P]
