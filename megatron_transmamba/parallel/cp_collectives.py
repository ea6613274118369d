"""Differentiable collectives of the context-parallel pieces (state passing, attention prefix).

``all_gather_rows`` is written here instead of using ``torch.distributed.nn.functional.
all_gather``: on gloo that function's backward scatters from group rank i as if it were global
rank i, which fails on a process group that does not start at global rank 0 (torch 2.13), as a
CP group inside data parallelism does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_rows"]


class _AllGatherRows(torch.autograd.Function):
    """All-gather [B, W, D] shards into [B, R W, D] in group order; the backward returns this
    rank's block of the sum over ranks of the gradient (a reduce-scatter; on gloo, which has
    none, an all-reduce and this rank's slice)."""

    @staticmethod
    def forward(ctx, shard: Tensor, group) -> Tensor:
        ctx.group = group
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group=group))]
        dist.all_gather(parts, shard.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        world, rank = dist.get_world_size(group=ctx.group), dist.get_rank(group=ctx.group)
        blocks = [block.contiguous() for block in grad.chunk(world, dim=1)]
        if dist.get_backend(ctx.group) == dist.Backend.GLOO:
            total = torch.cat(blocks, dim=1)
            dist.all_reduce(total, group=ctx.group)
            return total.chunk(world, dim=1)[rank].contiguous(), None
        mine = torch.empty_like(blocks[rank])
        dist.reduce_scatter(mine, blocks, group=ctx.group)
        return mine, None


def all_gather_rows(shard: Tensor, group) -> Tensor:
    """shard [B, W, D] of every rank of ``group`` -> [B, R W, D] (rank r's rows at r W),
    differentiable: each rank gets the gradient of its own rows, summed over ranks."""
    return _AllGatherRows.apply(shard, group)
