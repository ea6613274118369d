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


def use_few_kernel_steps(optimizer) -> None:
    """A step of a few kernels whatever the number of parameters (issue: the optimizer step).

    - torch's AdamW, which megatron-core builds without Transformer Engine or apex, runs
      ``fused`` (one kernel per parameter group and dtype; torch's default on GPUs is foreach,
      a few kernels per parameter, and on CPUs one tensor at a time with a host sync for each
      step counter). Set before the first step, so the step counters are created on the
      parameters' device, as fused needs.
    - megatron-core's distributed optimizer copies the updated main-parameter shards into the
      parameter buffer one tensor at a time; here the same copies run as one
      ``torch._foreach_copy_`` over views computed once.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for group in inner.param_groups:
                group["foreach"], group["fused"] = None, True
        if isinstance(part, DistributedOptimizer) and not part.is_stub_optimizer:
            part._copy_main_params_to_model_params = _foreach_main_to_model_copy(part)


def _foreach_main_to_model_copy(optimizer):
    """``DistributedOptimizer._copy_main_params_to_model_params`` (bf16/fp16 and fp32 groups, no
    FP8 or FSDP, which it refuses) as one foreach copy: the destination views into the parameter
    buffers are fixed, so they are computed on the first call."""
    if (optimizer.ddp_config.use_megatron_fsdp
            or optimizer.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8):
        raise ValueError("use_few_kernel_steps: megatron FSDP and the precision-aware optimizer "
                         "keep their own parameter copies")
    pairs: list = []

    def views():
        for main_groups, model_groups in ((optimizer.shard_fp32_from_float16_groups,
                                           optimizer.model_float16_groups),
                                          (optimizer.shard_fp32_groups, optimizer.model_fp32_groups)):
            for main_group, model_group in zip(main_groups, model_groups):
                for main, model in zip(main_group, model_group):
                    world = optimizer._get_model_param_range_map(model)["gbuf_world_in_bucket"]
                    index, _, bucket = optimizer.model_param_gbuf_map[model]
                    buffer = optimizer.buffers[index].buckets[bucket].param_data
                    yield buffer.view(-1)[world.start:world.end], main

    def copy():
        if not pairs:
            pairs.extend(views())
        if pairs:
            destinations, sources = zip(*pairs)
            torch._foreach_copy_(list(destinations), list(sources))

    return copy
