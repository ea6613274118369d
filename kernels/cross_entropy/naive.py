"""Cross entropy over a vocabulary split across tensor-parallel ranks: the specification of the
fused kernel.

loss_n = log sum_v exp(l_nv) - l_n,target over the full vocabulary V. Rank r of the group holds
the logits of vocabulary ids [r V_local, (r + 1) V_local); the max, the sum of exponentials
and the target logit are combined over the group with all-reduces (the arithmetic of
megatron-core's ``VocabParallelCrossEntropy``). Plain PyTorch in float32, float64 for float64
logits; autograd gives softmax - onehot.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group forward, identity backward: every rank's loss is the same global
    loss, so each rank's share of a sum receives the loss gradient unchanged."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def cross_entropy_naive(logits: Tensor, target: Tensor, tp_group=None) -> Tensor:
    """logits [N, V_local] (this rank's vocabulary slice; the whole vocabulary when
    ``tp_group`` is None or of size 1), target [N] global vocabulary ids -> loss [N] float32
    (float64 for float64 logits)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)
    vocab_local = x.shape[-1]
    split = tp_group is not None and dist.get_world_size(tp_group) > 1
    start = dist.get_rank(tp_group) * vocab_local if split else 0
    local = target - start
    owned = (local >= 0) & (local < vocab_local)
    target_logit = torch.where(owned, x.gather(-1, local.clamp(0, vocab_local - 1)[:, None])[:, 0], 0)
    # the max only shifts the exponentials: no gradient flows through it
    max_logit = x.max(-1).values.detach()
    if split:
        dist.all_reduce(max_logit, op=dist.ReduceOp.MAX, group=tp_group)
    sum_exp = torch.exp(x - max_logit[:, None]).sum(-1)
    if split:
        sum_exp = _AllReduceSum.apply(sum_exp, tp_group)
        target_logit = _AllReduceSum.apply(target_logit, tp_group)
    return torch.log(sum_exp) - (target_logit - max_logit)
