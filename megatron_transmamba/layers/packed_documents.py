"""Documents packed into the rows of a micro-batch, and causal attention that stays inside them.

A [B, S] micro-batch whose rows hold several documents (split after each EOD token, data option
``reset_at_eod``) is described by megatron-style ``cu_seqlens``: the document offsets in the
row-major flattened B*S tokens, every row start being one of them. The activations keep their
[S, B, d] layout; every layer gets the same ``PackedDocuments`` and keeps attention, the conv
and the SSM state inside each document (DESIGN section 1, last invariant), with positions and
TransPoints counted from each document's first token.

``document_attention`` is causal attention per document in a few dense calls: the documents'
tokens (or only their first ``limit`` tokens, the TransMamba prefix) are gathered into padded
batches, one per power-of-two length class, and each batch runs one causal attention call
(SDPA: flash / cuDNN on GPUs). Padding sits after each document's last token, so causality
alone keeps real queries off it: the result is exact, and the padding wastes at most 4x the
area of the longest document of each class.

Under context parallelism (R ranks, rank r holding tokens [r S, (r + 1) S) of every row) each
rank works on ``shard(r, R)``: the same description cut to its columns, whose documents may
have started on an earlier rank (``offsets``: the in-document position of each local piece's
first token) and keep the whole sequence's documents (``whole``) for what the other ranks hold.
``document_attention`` and ``buckets`` are for unsharded documents only; the CP layers use
``parallel/context_parallel_documents.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

import torch
from torch import Tensor

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class _Bucket:
    """Gather plan of one length class: token ``src[i]`` (flat b * S + t) sits at flat slot
    ``dst[i]`` of a zero-padded [num, width] batch."""
    src: Tensor
    dst: Tensor
    num: int
    width: int


@dataclass
class PackedDocuments:
    """Documents of a [B, S] micro-batch (``from_cu_seqlens``), or one context-parallel rank's
    columns of them (``shard``).

    megatron-core's attention reads ``qkv_format`` to decide on its THD path; ours is
    "sbhd": the layout is unchanged, only attention, conv and state respect the documents.
    """

    qkv_format: ClassVar[str] = "sbhd"
    cu_seqlens: Tensor          # [num_docs + 1] int32 offsets into the flattened B*S tokens
    seq_idx: Tensor             # [B, S] int32 document of each token, numbered row by row
    position_ids: Tensor        # [B, S] int64 position of each token inside its document
    spans: tuple                # ((row, start, end), ...) of each non-empty document (host)
    batch: int
    seq_len: int
    offsets: tuple = ()         # in-document position of each span's first token (host);
                                # () for all zero (unsharded)
    cp_rank: int = 0
    cp_size: int = 1
    whole: Optional["PackedDocuments"] = field(default=None, repr=False)  # a shard's: all T
    _plans: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def from_cu_seqlens(cu_seqlens: Tensor, batch: int, seq_len: int) -> "PackedDocuments":
        """cu_seqlens: [num_docs + 1] integer, non-decreasing from 0 to B*S, containing every
        row start r*S (a document never spans two rows); repeated offsets (empty documents)
        are allowed and dropped."""
        if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
        offsets = cu_seqlens.tolist()
        total = batch * seq_len
        if (len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != total
                or any(a > b for a, b in zip(offsets, offsets[1:]))):
            raise ValueError(f"cu_seqlens must be non-decreasing from 0 to B*S = {total}, "
                             f"got {offsets}")
        missing = sorted(set(range(0, total, seq_len)) - set(offsets))
        if missing:
            raise ValueError(f"cu_seqlens must start a document at every row start (multiples "
                             f"of S = {seq_len}); {missing} missing")
        starts = sorted({o for o in offsets[:-1] if o < total})
        spans = tuple((s // seq_len, s % seq_len, s % seq_len + (e - s))
                      for s, e in zip(starts, starts[1:] + [total]))
        device = cu_seqlens.device
        lengths = torch.tensor([e - s for _, s, e in spans], device=device)
        first = torch.tensor(starts, device=device)
        seq_idx = torch.repeat_interleave(torch.arange(len(spans), device=device), lengths,
                                          output_size=total)
        position_ids = torch.arange(total, device=device) - first[seq_idx]
        return PackedDocuments(
            cu_seqlens=torch.tensor(starts + [total], dtype=torch.int32, device=device),
            seq_idx=seq_idx.to(torch.int32).view(batch, seq_len),
            position_ids=position_ids.view(batch, seq_len), spans=spans, batch=batch,
            seq_len=seq_len)

    def shard(self, rank: int, size: int) -> "PackedDocuments":
        """Context-parallel rank ``rank`` of ``size``: columns [rank S', (rank + 1) S') of
        every row, S' = S / size. seq_idx keeps the whole sequence's document numbers and
        position_ids the positions inside the whole documents (a document started on an
        earlier rank continues its count); spans are the local pieces, ``offsets`` their first
        positions, ``whole`` these documents. size 1 returns ``self``."""
        if size == 1:
            return self
        if self.cp_size != 1:
            raise ValueError("shard: these documents are already a context-parallel shard")
        if self.seq_len % size or not 0 <= rank < size:
            raise ValueError(f"shard: rank {rank} of {size} for S = {self.seq_len} (S must be "
                             "divisible by the context-parallel size)")
        length = self.seq_len // size
        lo, hi = rank * length, (rank + 1) * length
        pieces = [(row, max(s, lo), min(e, hi), max(s, lo) - s) for row, s, e in self.spans
                  if s < hi and e > lo]
        starts = [row * length + s - lo for row, s, _, _ in pieces]
        device = self.seq_idx.device
        return PackedDocuments(
            cu_seqlens=torch.tensor(starts + [self.batch * length], dtype=torch.int32,
                                    device=device),
            seq_idx=self.seq_idx[:, lo:hi].contiguous(),
            position_ids=self.position_ids[:, lo:hi].contiguous(),
            spans=tuple((row, s - lo, e - lo) for row, s, e, _ in pieces), batch=self.batch,
            seq_len=length, offsets=tuple(offset for *_, offset in pieces), cp_rank=rank,
            cp_size=size, whole=self)

    @property
    def max_length(self) -> int:
        """The longest document (of the whole sequence for a shard)."""
        documents = self.whole if self.whole is not None else self
        return max(e - s for _, s, e in documents.spans)

    @property
    def max_offset(self) -> int:
        """The largest in-document position of a span's first token: 0 unless a document
        continues from an earlier context-parallel rank."""
        return max(self.offsets, default=0)

    def rotary_table(self, table: Tensor) -> Tensor:
        """A megatron RoPE table [S, 1, 1, dim] (positions 0..S-1; a shard: the whole
        sequence's) -> [S, B, 1, dim] (a shard: its S / R rows) with each token's angles at its
        position inside its document."""
        return table[:, 0, 0][self.position_ids.t()].unsqueeze(2)

    def buckets(self, limit: Optional[int] = None) -> list[_Bucket]:
        """Gather plans covering the first min(limit, length) tokens of every document, grouped
        by the power-of-two class of that length (cached per limit)."""
        if self.cp_size != 1:
            raise ValueError("buckets: a context-parallel shard's documents continue on other "
                             "ranks (use parallel.context_parallel_documents)")
        if limit not in self._plans:
            self._plans[limit] = self._make_buckets(limit)
        return self._plans[limit]

    def _make_buckets(self, limit: Optional[int]) -> list[_Bucket]:
        lengths = [min(e - s, limit) if limit is not None else e - s for _, s, e in self.spans]
        classes: dict[int, list[int]] = {}
        for doc, length in enumerate(lengths):
            if length > 0:
                classes.setdefault((length - 1).bit_length(), []).append(doc)
        device = self.seq_idx.device
        plans = []
        for docs in classes.values():
            lens = torch.tensor([lengths[d] for d in docs])
            width = int(lens.max())
            starts = torch.tensor([self.spans[d][0] * self.seq_len + self.spans[d][1]
                                   for d in docs])
            local = torch.arange(int(lens.sum())) - torch.repeat_interleave(
                torch.cumsum(lens, 0) - lens, lens)                   # position in the document
            src = torch.repeat_interleave(starts, lens) + local
            dst = torch.repeat_interleave(torch.arange(len(docs)) * width, lens) + local
            plans.append(_Bucket(src.to(device), dst.to(device), len(docs), width))
        return plans


def _gather(t: Tensor, bucket: _Bucket) -> Tensor:
    """[B, S, ...] -> [num, width, ...], zero after each document."""
    flat = t.reshape(-1, *t.shape[2:]).index_select(0, bucket.src)
    padded = flat.new_zeros(bucket.num * bucket.width, *t.shape[2:]).index_copy(0, bucket.dst, flat)
    return padded.view(bucket.num, bucket.width, *t.shape[2:])


def document_attention(q: Tensor, k: Tensor, v: Tensor, documents: PackedDocuments,
                       attend: Attend, limit: Optional[int] = None) -> Tensor:
    """Causal attention inside each document, on its first ``limit`` tokens (all when None).

    Args:
        q, k, v: [B, S, heads, dim] (head counts and dims may differ, as ``attend`` allows).
        attend: dense causal attention [n, L, ...] x3 -> [n, L, heads_out, dim_out] over
            sequences that start at position 0 (so RoPE inside it sees document positions).

    Returns:
        [B, S, heads_out, dim_out]; rows of tokens past ``limit`` in their document are zero.
    """
    batch, seq_len = q.shape[:2]
    sources, values = [], []
    for bucket in documents.buckets(limit):
        out = attend(_gather(q, bucket), _gather(k, bucket), _gather(v, bucket))
        values.append(out.reshape(-1, *out.shape[2:]).index_select(0, bucket.dst))
        sources.append(bucket.src)
    values = torch.cat(values)
    out = values.new_zeros(batch * seq_len, *values.shape[1:]).index_copy(
        0, torch.cat(sources), values)
    return out.view(batch, seq_len, *values.shape[1:])
