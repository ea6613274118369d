"""The causal depthwise conv under context parallelism (CP): a halo exchange between shards.

Mamba-2's short convolution (kernels/conv/naive.py: out[t] = SiLU(bias + sum_{j<W}
weight[:, 0, j] * in[t - (W-1) + j])) reads the W-1 tokens before t. With the sequence cut
into contiguous shards over a CP group (rank r holds tokens [r*S, (r+1)*S)), the first W-1
outputs of rank r read the last W-1 input rows of rank r-1, its halo. Each rank sends its last
W-1 rows to rank r+1 and receives rank r-1's (zeros on rank 0: the sequence start, exactly
the conv's zero padding), prepends them, runs the conv on [B, W-1+S, C] and drops the first
W-1 outputs. The exchange is an autograd.Function: its backward sends the halo's gradient back
to rank r-1, which adds it to the gradient of its last W-1 rows. Weight and bias gradients
stay per-rank partial sums, reduced over CP by whatever reduces the other parameter gradients.
Traffic per conv layer: B x (W-1) x C elements per rank each way, in forward and again in
backward (point-to-point to the neighbour only, independent of S and of the CP size).
The mixer (layers/transmamba_mixer.py) runs it with its backend's conv: the plain-PyTorch
``causal_conv1d_silu_naive`` or the Triton conv, each on the concatenated [halo | shard] copy.
Packed documents (``seq_idx`` and in-document ``position_ids`` of the shard): halo row j, at
distance W-1-j before the shard's first token, belongs to that token's document exactly when
the token's position is at least W-1-j; the other halo rows get another document index, so the
conv's ``seq_idx`` mask reads them as zero. No document index crosses the wire. Not done: a
Triton conv that reads the halo as an initial conv state instead of the concatenated copy
(one fewer pass over the shard's conv input).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from transmamba_kernels.conv.naive import causal_conv1d_silu_naive

__all__ = ["context_parallel_causal_conv1d_silu"]


def _exchange(send: Optional[Tensor], send_to: Optional[int], recv: Optional[Tensor],
              recv_from: Optional[int], group) -> None:
    """Send ``send`` to group rank ``send_to`` and fill ``recv`` from group rank ``recv_from``,
    both posted before either waits, so the chain of neighbours cannot deadlock."""
    works = []
    if recv is not None:
        works.append(dist.irecv(recv, src=dist.get_global_rank(group, recv_from), group=group))
    if send is not None:
        works.append(dist.isend(send, dst=dist.get_global_rank(group, send_to), group=group))
    for work in works:
        work.wait()


class _HaloExchange(torch.autograd.Function):
    """tail [B, W-1, C] (this rank's last rows) -> halo [B, W-1, C] (rank r-1's last rows)."""

    @staticmethod
    def forward(ctx, tail: Tensor, group) -> Tensor:
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        ctx.group, ctx.rank, ctx.size = group, rank, size
        # rank 0 keeps zeros: nothing precedes the sequence; gloo needs contiguous buffers
        halo = torch.zeros_like(tail, memory_format=torch.contiguous_format)
        _exchange(
            send=tail.contiguous() if rank < size - 1 else None, send_to=rank + 1,
            recv=halo if rank > 0 else None, recv_from=rank - 1, group=group,
        )
        return halo

    @staticmethod
    def backward(ctx, grad_halo: Tensor):
        # the last rank's tail feeds no halo: its gradient from here is zero
        grad_tail = torch.zeros_like(grad_halo, memory_format=torch.contiguous_format)
        _exchange(
            send=grad_halo.contiguous() if ctx.rank > 0 else None, send_to=ctx.rank - 1,
            recv=grad_tail if ctx.rank < ctx.size - 1 else None, recv_from=ctx.rank + 1,
            group=ctx.group,
        )
        return grad_tail, None


def context_parallel_causal_conv1d_silu(
    x: Tensor, weight: Tensor, bias: Tensor, cp_group=None,
    conv: Callable[..., Tensor] = causal_conv1d_silu_naive,
    seq_idx: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
) -> Tensor:
    """Causal depthwise conv + bias + SiLU of this rank's sequence shard.

    Args:
        x: [B, S, C] this rank's contiguous shard (rank r of cp_group: tokens [r*S, (r+1)*S)).
        weight: [C, 1, W] depthwise conv weight; bias: [C].
        cp_group: the context-parallel process group; None or size 1 runs the plain conv.
        conv: the single-sequence conv, (x [B, T, C], weight, bias, seq_idx=None) -> [B, T, C].
        seq_idx, position_ids: [B, S] packed documents of the shard: each token's document
            index and its position inside the whole document (a document that started on an
            earlier rank continues its count); both or neither.

    Returns:
        [B, S, C], equal to rows [r*S, (r+1)*S) of ``conv`` over the whole sequence.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be [B, S, C], got {tuple(x.shape)}")
    if (seq_idx is None) != (position_ids is None):
        raise ValueError("context-parallel conv: pass seq_idx and position_ids together")
    documents = () if seq_idx is None else (seq_idx,)
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return conv(x, weight, bias, *documents)
    halo_len, shard_len = weight.shape[-1] - 1, x.shape[1]
    if halo_len == 0:
        return conv(x, weight, bias, *documents)
    if shard_len < halo_len:
        raise ValueError(
            f"context-parallel conv: the shard length S = {shard_len} is shorter than the halo "
            f"W - 1 = {halo_len}; each shard must hold at least W - 1 tokens"
        )
    halo = _HaloExchange.apply(x[:, shard_len - halo_len:], cp_group)  # [B, W-1, C]
    if seq_idx is not None:
        first = seq_idx[:, :1]                                         # [B, 1]
        distance = torch.arange(halo_len, 0, -1, device=x.device)      # W-1 .. 1
        same = position_ids[:, :1] >= distance                         # [B, W-1]
        documents = (torch.cat([torch.where(same, first, first - 1), seq_idx], dim=1),)
    out = conv(torch.cat([halo, x], dim=1), weight, bias, *documents)  # [B, W-1+S, C]
    return out[:, halo_len:]
