"""Causal attention inside packed documents under context parallelism (CP).

Rank r of the CP group holds columns [r S, (r + 1) S) of every row of a [B, R S] micro-batch
whose rows hold packed documents (``PackedDocuments.shard``); a document may start on one rank
and continue on the next ones. Attention stays inside each document (DESIGN section 1, last
invariant): the token at position j of its document sees the document's positions 0..j, the
first ``limit`` of them only for the TransMamba prefix (the layer's TransPoint p, per document:
tokens at positions j < p) and all of them for a ``*`` layer. Keys at positions the query's rank
does not hold live on earlier ranks. Every rank knows the whole micro-batch's documents, so the
exchange is planned without communication: rank q sends the keys and values of exactly the
tokens a later rank reads (those of a document, before ``limit``, that continues past q's last
column: at most one document per row), all ranks' sets padded to the largest, W rows, in ONE
autograd all-gather (``cp_collectives.all_gather_rows``; its backward returns each rank the sum
of every rank's gradient of its rows). Each rank then attends, for every document with query
rows here, over the gathered rows of the document's earlier part and its own rows: documents
are batched by the power-of-two class of their key count, zero-padded, and every batch is one
SDPA call with a boolean mask ``key position <= query position`` (a padded query sees every
key, so no row is empty; a real query sees no padding). The result is exact. Traffic per layer
per rank, forward: the all-gather receives (R - 1) x W rows of hk (d + dv) elements, W <= B S
for a ``*`` layer and W <= B min(S, p) for a TransMamba prefix (no all-gather at all when no
document's attention tokens cross a shard boundary); the backward moves as much again. The
plan (index tensors, masks) is built on the host once per micro-batch and limit, and cached on
the shard. Not done: a ring exchange overlapped with compute, flash attention (the boolean
mask takes SDPA's memory-efficient or math kernel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megatron_transmamba.layers.packed_documents import PackedDocuments
from megatron_transmamba.parallel.cp_collectives import all_gather_rows

__all__ = ["context_parallel_document_attention"]

_PAD = torch.iinfo(torch.int64).max      # position of padding, queries and keys alike


@dataclass
class _Bucket:
    """One SDPA call: ``num`` documents, queries padded to ``width_q`` and keys to ``width_k``."""
    query_src: Tensor   # [n] local flat index (b S + t) of each query
    query_dst: Tensor   # [n] its slot in the [num * width_q] padded queries
    key_src: Tensor     # [m] its row in [gathered (R W) | local (B S)]
    key_dst: Tensor     # [m] its slot in the [num * width_k] padded keys
    mask: Tensor        # [num, 1, width_q, width_k] bool: key position <= query position
    num: int
    width_q: int
    width_k: int


@dataclass
class _Plan:
    send: Tensor        # [n_r] local flat indices of the rows this rank sends, in order
    width: int          # W, the rows per rank in the all-gather (0: no all-gather)
    buckets: list


def _plan(documents: PackedDocuments, limit: Optional[int]) -> _Plan:
    """The exchange and the SDPA batches of this rank (cached on ``documents`` per limit)."""
    key = ("context_parallel", limit)
    if key not in documents._plans:
        documents._plans[key] = _make_plan(documents, limit)
    return documents._plans[key]


def _make_plan(documents: PackedDocuments, limit: Optional[int]) -> _Plan:
    whole = documents.whole if documents.whole is not None else documents
    rank, ranks, shard = documents.cp_rank, documents.cp_size, documents.seq_len
    sends = [[] for _ in range(ranks)]      # per rank: (first flat index, count) of each piece
    sent_at = {}                            # (document, rank) -> first slot in its send rows
    counts = [0] * ranks
    segments = []                           # (document, row, start, first query, query end)
    for doc, (row, start, end) in enumerate(whole.spans):
        stop = end if limit is None else min(end, start + limit)   # attention tokens [start, stop)
        if stop <= start:
            continue
        for q in range(start // shard, (stop - 1) // shard):       # read by a later rank
            lo = max(start, q * shard)
            sent_at[doc, q] = counts[q]
            sends[q].append((row * shard + lo - q * shard, (q + 1) * shard - lo))
            counts[q] += (q + 1) * shard - lo
        first, last = max(start, rank * shard), min(stop, (rank + 1) * shard)
        if first < last:
            segments.append((doc, row, start, first, last))
    width = max(counts)
    base = rank * shard
    classes: dict[int, list] = {}
    for segment in segments:
        keys = segment[4] - segment[2]
        classes.setdefault((keys - 1).bit_length(), []).append(segment)
    buckets = []
    for members in classes.values():
        width_q = max(last - first for *_, first, last in members)
        width_k = max(last - start for _, _, start, _, last in members)
        query_src, query_dst, key_src, key_dst = [], [], [], []
        query_pos = torch.full((len(members), width_q), _PAD)
        key_pos = torch.full((len(members), width_k), _PAD)
        for i, (doc, row, start, first, last) in enumerate(members):
            n = last - first
            query_src.append(row * shard + first - base + torch.arange(n))
            query_dst.append(i * width_q + torch.arange(n))
            query_pos[i, :n] = torch.arange(first - start, last - start)
            for q in range(start // shard, rank):                  # earlier ranks' rows
                lo = max(start, q * shard)
                m = (q + 1) * shard - lo
                key_src.append(q * width + sent_at[doc, q] + torch.arange(m))
            own = last - max(start, base)                          # this rank's rows
            key_src.append(ranks * width + row * shard + max(start, base) - base
                           + torch.arange(own))
            key_dst.append(i * width_k + torch.arange(last - start))
            key_pos[i, :last - start] = torch.arange(last - start)
        mask = key_pos[:, None, None, :] <= query_pos[:, None, :, None]
        device = documents.seq_idx.device
        buckets.append(_Bucket(*(torch.cat(t).to(device) for t in
                                 (query_src, query_dst, key_src, key_dst)),
                               mask.to(device), len(members), width_q, width_k))
    send = [torch.arange(lo, lo + n) for lo, n in sends[rank]]
    send = torch.cat(send) if send else torch.zeros(0, dtype=torch.long)
    return _Plan(send.to(documents.seq_idx.device), width, buckets)


def context_parallel_document_attention(q: Tensor, k: Tensor, v: Tensor,
                                        documents: PackedDocuments, softmax_scale: float,
                                        cp_group=None, limit: Optional[int] = None) -> Tensor:
    """Causal attention inside each document, on its first ``limit`` tokens (all when None),
    for the tokens of this CP rank.

    Args:
        q: [B, S, hq, d], k: [B, S, hk, d], v: [B, S, hk, dv]: this rank's shard, q and k
            rotated at their positions inside their documents; hq a multiple of hk (GQA).
        documents: ``PackedDocuments.shard(r, R)`` of the micro-batch (or unsharded ones).
        softmax_scale: the softmax temperature.
        cp_group: the CP process group of R ranks, ranks in sequence order.
        limit: the TransPoint p: only tokens at positions < p of their document attend, over
            their document's positions < p; None: every token.

    Returns:
        [B, S, hq, dv]; rows of tokens at positions >= ``limit`` are zero. Every rank must call
        this and, when training, run the backward through its output (the all-gather and its
        backward are collective; whether they run depends only on the whole micro-batch).
    """
    world = 1 if cp_group is None else dist.get_world_size(group=cp_group)
    if documents.cp_size != world or (world > 1 and documents.cp_rank
                                      != dist.get_rank(group=cp_group)):
        raise ValueError(f"documents of CP rank {documents.cp_rank} of {documents.cp_size} "
                         f"given to a CP group of {world} rank(s)")
    batch, shard, q_heads, key_dim = q.shape
    kv_heads, value_dim = v.shape[2:]
    if (batch, shard) != (documents.batch, documents.seq_len) or q_heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not "
                         f"fit documents of [B, S] = [{documents.batch}, {documents.seq_len}]")
    plan = _plan(documents, limit)
    local = torch.cat([k.reshape(batch * shard, kv_heads * key_dim),
                       v.reshape(batch * shard, kv_heads * value_dim)], dim=1)  # [B S, hk (d + dv)]
    sources = local
    if plan.width:
        rows = local.index_select(0, plan.send)
        rows = F.pad(rows, (0, 0, 0, plan.width - rows.shape[0]))               # [W, .]
        sources = torch.cat([all_gather_rows(rows[None], cp_group)[0], local])  # [R W + B S, .]
    keys = sources[:, :kv_heads * key_dim].view(-1, kv_heads, key_dim)
    values = sources[:, kv_heads * key_dim:].view(-1, kv_heads, value_dim)
    queries = q.reshape(batch * shard, q_heads, key_dim)
    outs, rows_out = [], []
    for b in plan.buckets:
        qb = _scatter(queries.index_select(0, b.query_src), b.query_dst, b.num, b.width_q)
        kb = _scatter(keys.index_select(0, b.key_src), b.key_dst, b.num, b.width_k)
        vb = _scatter(values.index_select(0, b.key_src), b.key_dst, b.num, b.width_k)
        out = F.scaled_dot_product_attention(
            qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2), attn_mask=b.mask,
            scale=softmax_scale, enable_gqa=q_heads != kv_heads)       # [num, hq, wq, dv]
        out = out.transpose(1, 2).reshape(-1, q_heads, value_dim)     # [num wq, hq, dv]
        outs.append(out.index_select(0, b.query_dst))
        rows_out.append(b.query_src)
    if not outs:    # no query here: the output stays on the gathered rows' graph all the same
        outs = [values[:0, :1].expand(0, q_heads, value_dim)]
        rows_out = [plan.send[:0]]
    out = values.new_zeros(batch * shard, q_heads, value_dim).index_copy(
        0, torch.cat(rows_out), torch.cat(outs))
    return out.view(batch, shard, q_heads, value_dim)


def _scatter(rows: Tensor, slots: Tensor, num: int, width: int) -> Tensor:
    """[n, heads, dim] rows -> [num, width, heads, dim], zero where no row lands."""
    padded = rows.new_zeros(num * width, *rows.shape[1:]).index_copy(0, slots, rows)
    return padded.view(num, width, *rows.shape[1:])
