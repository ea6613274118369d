"""Cross entropy over a (tensor-parallel) vocabulary without float32 logits (Triton).

Same function as ``naive.cross_entropy_naive``. The forward reads each row of logits once,
in its own dtype, keeping the running max, the sum of exp(l - max) (rescaled online, as in
Milakov & Gimelshein 2018) and the target logit in float32 registers: with the whole
vocabulary on this rank it writes the loss directly (one launch); with a vocabulary split over
a tensor-parallel group it writes those three [N] statistics, which are combined with two
all-reduces and a few [N] ops. The backward writes dlogits = (softmax - onehot) dloss in the
logits' dtype in one launch, recomputing the softmax from the log-sum-exp, so no [N, V] float32
tensor exists in either direction. The kernels are ``torch.library`` custom ops
(``transmamba::cross_entropy*``); the all-reduces stay outside them.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch import Tensor

from ..custom_op import custom_op

__all__ = ["cross_entropy_triton"]


@triton.jit
def _cross_entropy_fwd_kernel(logits_ptr, target_ptr, out_ptr, N, V, stride_row, vocab_start,
                              BLOCK_V: tl.constexpr, SPLIT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(base + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    t = tl.load(target_ptr + row) - vocab_start
    owned = (t >= 0) & (t < V)
    target_logit = tl.load(base + t, mask=owned, other=0.0).to(tl.float32)
    if SPLIT:   # [local max, sum exp(l - local max), target logit (0 if not owned), max again]
        tl.store(out_ptr + row, m)
        tl.store(out_ptr + N + row, s)
        tl.store(out_ptr + 2 * N + row, target_logit)
        tl.store(out_ptr + 3 * N + row, m)
    else:
        # log s - (target - max): no rounding of a large max + log s
        tl.store(out_ptr + row, tl.log(s) - (target_logit - m))


@triton.jit
def _cross_entropy_bwd_kernel(logits_ptr, target_ptr, shift_ptr, offset_ptr, dloss_ptr,
                              dlogits_ptr, V, stride_row, stride_dloss, vocab_start,
                              BLOCK_V: tl.constexpr, SHIFT_IS_TARGET: tl.constexpr):
    # softmax = exp((l - shift) - offset) with lse = shift + offset never rounded as a sum:
    # shift = the target logit and offset = the loss (whole vocabulary), or shift = the max and
    # offset = log sum exp(l - max) (split vocabulary)
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    t = tl.load(target_ptr + row) - vocab_start
    offset = tl.load(offset_ptr + row)
    if SHIFT_IS_TARGET:
        shift = tl.load(base + t, mask=(t >= 0) & (t < V), other=0.0).to(tl.float32)
    else:
        shift = tl.load(shift_ptr + row)
    dloss = tl.load(dloss_ptr + row * stride_dloss).to(tl.float32)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        x = tl.load(base + c, mask=c < V, other=float("-inf")).to(tl.float32)
        grad = (tl.exp((x - shift) - offset) - tl.where(c == t, 1.0, 0.0)) * dloss
        tl.store(dlogits_ptr + row * V + c, grad.to(dlogits_ptr.dtype.element_ty), mask=c < V)


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_MAX_BLOCK_V = 256 if _INTERPRET else 4096
_NUM_WARPS = 8


def _block_v(vocab: int) -> int:
    return min(triton.next_power_of_2(vocab), _MAX_BLOCK_V)


def _forward(logits: Tensor, target: Tensor, vocab_start: int, split: bool) -> Tensor:
    """Launcher: loss [N] (``split`` False) or statistics [4, N] (float32)."""
    rows, vocab = logits.shape
    out = torch.empty((4, rows) if split else (rows,), dtype=torch.float32, device=logits.device)
    if rows:
        _cross_entropy_fwd_kernel[(rows,)](logits, target, out, rows, vocab, logits.stride(0),
                                           vocab_start, BLOCK_V=_block_v(vocab), SPLIT=split,
                                           num_warps=_NUM_WARPS)
    return out


@custom_op("transmamba::cross_entropy")
def _cross_entropy_op(logits: Tensor, target: Tensor) -> Tensor:
    return _forward(logits, target, 0, False)


@_cross_entropy_op.register_fake
def _(logits, target):
    return logits.new_empty(logits.shape[:1], dtype=torch.float32)


@custom_op("transmamba::cross_entropy_stats")
def _cross_entropy_stats_op(logits: Tensor, target: Tensor, vocab_start: int) -> Tensor:
    return _forward(logits, target, vocab_start, True)


@_cross_entropy_stats_op.register_fake
def _(logits, target, vocab_start):
    return logits.new_empty((4, logits.shape[0]), dtype=torch.float32)


@custom_op("transmamba::cross_entropy_backward")
def _cross_entropy_backward_op(dloss: Tensor, logits: Tensor, target: Tensor, offset: Tensor,
                               shift: Optional[Tensor], vocab_start: int) -> Tensor:
    """dlogits [N, V_local] (contiguous, logits' dtype); log-sum-exp = shift + offset [N], with
    shift None meaning the target logit (whole vocabulary: offset is the loss)."""
    rows, vocab = logits.shape
    dlogits = torch.empty((rows, vocab), dtype=logits.dtype, device=logits.device)
    if rows:
        _cross_entropy_bwd_kernel[(rows,)](logits, target, offset if shift is None else shift,
                                           offset, dloss, dlogits, vocab, logits.stride(0),
                                           dloss.stride(0), vocab_start, BLOCK_V=_block_v(vocab),
                                           SHIFT_IS_TARGET=shift is None, num_warps=_NUM_WARPS)
    return dlogits


@_cross_entropy_backward_op.register_fake
def _(dloss, logits, target, offset, shift, vocab_start):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output)


def _backward(ctx, dloss):
    logits, target, loss = ctx.saved_tensors
    return _cross_entropy_backward_op(dloss, logits, target, loss, None, 0), None


_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """The split vocabulary: kernel statistics, then the all-reduces, in eager PyTorch."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, tp_group) -> Tensor:
        vocab_start = dist.get_rank(tp_group) * logits.shape[1]
        stats = _cross_entropy_stats_op(logits, target, vocab_start)    # [4, N]
        local_max, sum_exp, target_logit, max_logit = stats
        dist.all_reduce(max_logit, op=dist.ReduceOp.MAX, group=tp_group)
        sum_exp.mul_(torch.exp(local_max - max_logit))
        dist.all_reduce(stats[1:3], group=tp_group)                    # sum_exp, target_logit
        log_sum_exp = torch.log(sum_exp)
        ctx.save_for_backward(logits, target, max_logit, log_sum_exp)
        ctx.vocab_start = vocab_start
        return log_sum_exp - (target_logit - max_logit)

    @staticmethod
    def backward(ctx, dloss: Tensor):
        logits, target, max_logit, log_sum_exp = ctx.saved_tensors
        return _cross_entropy_backward_op(dloss, logits, target, log_sum_exp, max_logit,
                                          ctx.vocab_start), None, None


def cross_entropy_triton(logits: Tensor, target: Tensor, tp_group=None) -> Tensor:
    """Fused ``cross_entropy_naive``: logits [N, V_local] in bf16, fp16 or fp32 (this rank's
    vocabulary ids [r V_local, (r + 1) V_local) of a vocabulary split over ``tp_group``; the
    whole vocabulary when ``tp_group`` is None or of size 1), rows may be strided; target [N]
    integer global ids -> loss [N] float32 = logsumexp over the vocabulary - logit[target].
    The gradient is dlogits in the logits' dtype. Launches with the whole vocabulary: one
    forward, one backward."""
    if logits.dim() != 2 or target.shape != logits.shape[:1] or target.is_floating_point():
        raise ValueError(f"logits must be [N, V] and target integer [N]; got "
                         f"{tuple(logits.shape)} and {target.dtype} {tuple(target.shape)}")
    if logits.dtype == torch.float64:
        raise TypeError("cross_entropy_triton: float64 is not supported (use cross_entropy_naive)")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if target.stride(0) != 1:
        target = target.contiguous()
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        return _VocabParallelCrossEntropy.apply(logits, target, tp_group)
    return _cross_entropy_op(logits, target)
