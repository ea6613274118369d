"""Foreach versions of megatron-core's multi-tensor fallbacks, for machines without Transformer
Engine or apex.

Without either, megatron-core's optimizer uses ``megatron.core.utils.local_multi_tensor_*``:
the gradient norm takes one ``torch.norm`` per tensor and turns every result into a Python
float (one host sync per tensor), and gradient clipping and the main -> model parameter copy run
one multiply and one copy per tensor. With ~750 tensors at 1B parameters that is ~1,500 syncs
and ~3,000 small kernels a step, which the profile of the 1.5B runs showed in every step
(docs/parallelism.md). These replacements keep the signatures and the values (a norm of
per-tensor L2 norms; an exact copy when the scale is 1) and use ``torch._foreach_*``: a few
kernel launches and no host sync.
"""

from __future__ import annotations

import torch


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """``amp_C.multi_tensor_l2norm``: ([1] float32 global L2 norm, None), on the tensors' device."""
    tensors = tensor_lists[0]
    norms = torch._foreach_norm(tensors)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    return total.reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """``amp_C.multi_tensor_scale``: dst = src * scale for each pair (dst may be src)."""
    src, dst = tensor_lists
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def install_foreach_multi_tensor_ops() -> bool:
    """Point megatron-core's optimizer at the foreach versions where it uses its local fallbacks
    (Transformer Engine's and apex's fused kernels are left in place). True if they are in use
    after the call."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = foreach_l2_norm
    for module in (clip_grads, optimizer):
        if module.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = foreach_scale
    return clip_grads.l2_norm_impl is foreach_l2_norm
