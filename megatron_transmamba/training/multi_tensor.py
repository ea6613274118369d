"""Foreach versions of megatron-core's multi-tensor fallbacks, for machines without Transformer
Engine or apex.

Without either, megatron-core's optimizer uses ``megatron.core.utils.local_multi_tensor_*``:
the gradient norm takes one ``torch.norm`` per tensor and turns every result into a Python
float (one host sync per tensor), and gradient clipping and the main -> model parameter copy run
one multiply and one copy per tensor. With ~750 tensors at 1B parameters that is ~1,500 syncs
and ~3,000 small kernels a step, which the profile of the 1.5B runs showed in every step
(docs/parallelism.md). These replacements keep the signatures and the values (a norm of
per-tensor L2 norms; an exact copy when the scale is 1) and use ``torch._foreach_*``: a few
kernel launches and no host sync. ``megatron_adapter`` (patches ``foreach_l2_norm`` and
``foreach_scale``) points megatron-core at them once, where it uses its local fallbacks.
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


def use_few_kernel_steps(optimizer) -> None:
    """A step of a few kernels whatever the number of parameters (issue: the optimizer step).

    torch's AdamW, which megatron-core builds without Transformer Engine or apex, runs ``fused``
    (one kernel per parameter group and dtype; torch's default on GPUs is foreach, a few
    kernels per parameter, and on CPUs one tensor at a time with a host sync for each step
    counter). Set before the first step, so the step counters are created on the parameters'
    device, as fused needs. megatron-core's own per-tensor loops (norm, clip, the distributed
    optimizer's main -> model copy) run the foreach versions through ``megatron_adapter``'s
    patches ``foreach_l2_norm``, ``foreach_scale`` and ``distributed_optimizer_foreach_copy``.
    """
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for group in inner.param_groups:
                group["foreach"], group["fused"] = None, True
