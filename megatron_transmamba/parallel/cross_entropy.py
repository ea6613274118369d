"""Cross entropy over a vocabulary split across tensor-parallel ranks, on an explicit group.

megatron-core's ``vocab_parallel_cross_entropy`` reads the global tensor-parallel group, and
its fused variant casts gradients to bf16; this is the unfused one with the group passed in.
Each rank holds logits for vocabulary rows ``[r * V/tp, (r + 1) * V/tp)``; the loss
``log(sum_v exp(l_v)) - l_target`` needs the max, the sum of exponentials and the target
logit over all ranks: three all-reduces forward, none backward (the gradient
``softmax - onehot`` is local). The arithmetic is megatron-core's ``VocabParallelCrossEntropy``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.utils import VocabUtility
from torch import Tensor


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, tp_group) -> Tensor:
        logits, logits_max = VocabParallelCrossEntropy.calculate_logits_max(logits)
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=tp_group)
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            logits.shape[-1], dist.get_rank(tp_group), dist.get_world_size(tp_group))
        target_mask, masked_target, predicted, sum_exp, exp_logits = (
            VocabParallelCrossEntropy.calculate_predicted_logits(logits, target, logits_max,
                                                                 start, end))
        dist.all_reduce(predicted, group=tp_group)
        dist.all_reduce(sum_exp, group=tp_group)
        softmax, loss = VocabParallelCrossEntropy.calculate_cross_entropy_loss(
            exp_logits, predicted, sum_exp)
        ctx.save_for_backward(softmax, target_mask, masked_target)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        softmax, target_mask, masked_target = ctx.saved_tensors
        grad_2d, arange, update, grad_input = (
            VocabParallelCrossEntropy.prepare_gradient_calculation_operands(softmax, target_mask))
        grad_input = VocabParallelCrossEntropy.calculate_gradients(
            grad_2d, arange, masked_target, update, grad_input, grad_output)
        return grad_input, None, None


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, tp_group) -> Tensor:
    """logits [S, B, V/tp] (this rank's vocabulary rows), target [S, B] -> loss [S, B] (float32).

    ``logits`` is overwritten (megatron-core's in-place arithmetic): pass a tensor that is not
    needed afterwards, e.g. ``logits.float()`` of a lower-precision tensor or a clone.
    """
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group)
