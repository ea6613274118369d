"""Patches of megatron-core's optimizer, on every machine: fewer kernels per step, and three fixes
of the distributed optimizer's checkpoint state.

- ``foreach_l2_norm`` / ``foreach_scale``: without Transformer Engine or apex, megatron-core's
  gradient norm, clipping and main -> model copy use ``megatron.core.utils.local_multi_tensor_*``
  (one ``torch.norm`` and one host sync per tensor, one multiply and one copy per tensor). They
  are replaced by the ``torch._foreach_*`` versions of ``training/multi_tensor.py`` (same
  values, a few kernels, no host sync). Transformer Engine's and apex's kernels are left alone.
- ``distributed_optimizer_foreach_copy``: ``DistributedOptimizer`` copies the updated
  main-parameter shards into the parameter buffer one tensor at a time; here as one
  ``torch._foreach_copy_`` over views computed on the first call. FSDP, the precision-aware
  optimizer and FP8 parameters keep megatron-core's copy.
- ``fully_reshardable_bucket_padding``: megatron-core 0.16 builds the ``fully_reshardable``
  state from ``get_parameter_state_dp_zero``, whose tensors leave out the padding between DDP
  buckets while the parameter offsets that cut them apart count it, so every parameter after a
  chunk's first bucket would be saved (and loaded) with another one's Adam moments and main
  weights. Inside ``sharded_param_state_fully_reshardable`` the state is laid out as the buffer
  is (docs/checkpoints.md; tests/parallel/test_tied_embeddings_parallel.py fails once
  megatron-core fixes it).
- ``fully_reshardable_load_keeps_adam_step``: ``load_parameter_state_from_fully_reshardable``
  copies every state entry from the loaded tensors, torch Adam's ``step`` included, which they
  do not hold: ``step`` is kept aside meanwhile.
- ``distributed_optimizer_own_step_tensors``: without apex / TE, ``load_state_dict`` gives
  every parameter the same ``step`` tensor, which torch's fused Adam would then advance once
  per parameter: each gets its own copy.
"""

from __future__ import annotations

import contextvars
import functools
import weakref

import torch

from megatron_transmamba.megatron_adapter.patching import Replace
from megatron_transmamba.training.multi_tensor import foreach_l2_norm, foreach_scale

_DISTRIB = "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer"


def _is_local_l2_norm(impl) -> bool:
    from megatron.core import utils
    return impl is utils.local_multi_tensor_l2_norm


def _is_local_scale(impl) -> bool:
    from megatron.core import utils
    return impl is utils.local_multi_tensor_scale


# DistributedOptimizer -> [(parameter-buffer view, main shard)], or None: megatron-core's copy.
_MAIN_TO_MODEL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _main_to_model_pairs(optimizer):
    """The (destination view, main shard) pairs of ``_copy_main_params_to_model_params`` (bf16 /
    fp16 and fp32 groups), or None where megatron-core's own copy is needed."""
    from megatron.core.fp8_utils import is_float8tensor

    if (optimizer.is_stub_optimizer or optimizer.ddp_config.use_megatron_fsdp
            or optimizer.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8):
        return None
    pairs = []
    for main_groups, model_groups in ((optimizer.shard_fp32_from_float16_groups,
                                       optimizer.model_float16_groups),
                                      (optimizer.shard_fp32_groups, optimizer.model_fp32_groups)):
        for main_group, model_group in zip(main_groups, model_groups):
            for main, model in zip(main_group, model_group):
                if is_float8tensor(model):
                    return None
                world = optimizer._get_model_param_range_map(model)["gbuf_world_in_bucket"]
                index, _, bucket = optimizer.model_param_gbuf_map[model]
                buffer = optimizer.buffers[index].buckets[bucket].param_data
                pairs.append((buffer.view(-1)[world.start:world.end], main))
    return pairs


def _foreach_main_to_model_copy(original):
    @functools.wraps(original)
    def _copy_main_params_to_model_params(self):
        if self not in _MAIN_TO_MODEL:
            _MAIN_TO_MODEL[self] = _main_to_model_pairs(self)
        pairs = _MAIN_TO_MODEL[self]
        if pairs is None:
            return original(self)
        if pairs:
            destinations, sources = zip(*pairs)
            torch._foreach_copy_(list(destinations), list(sources))
        return None

    return _copy_main_params_to_model_params


_IN_FULLY_RESHARDABLE = contextvars.ContextVar("in_fully_reshardable", default=False)


def _bucket_padded_state(optimizer, state):
    """``get_parameter_state_dp_zero``'s state with each buffer's tensors laid out as the buffer
    is: bucket b's values at ``bucket.offset``, zeros in the padding."""
    if state is None:
        return None
    for index, buffer in enumerate(optimizer.buffers):
        for world in state[index].values():
            for key in ("param", "exp_avg", "exp_avg_sq"):
                if key not in world:
                    continue
                padded = torch.zeros(buffer.numel, dtype=world[key].dtype)
                start = 0                                  # in the unpadded tensor
                for bucket in buffer.buckets:
                    padded[bucket.offset:bucket.offset + bucket.numel_unpadded] = \
                        world[key][start:start + bucket.numel_unpadded]
                    start += bucket.numel_unpadded
                world[key] = padded
    return state


def _padded_in_fully_reshardable(original):
    @functools.wraps(original)
    def get_parameter_state_dp_zero(self, *args, **kwargs):
        state = original(self, *args, **kwargs)
        return _bucket_padded_state(self, state) if _IN_FULLY_RESHARDABLE.get() else state

    return get_parameter_state_dp_zero


def _marks_fully_reshardable(original):
    @functools.wraps(original)
    def sharded_param_state_fully_reshardable(self, *args, **kwargs):
        token = _IN_FULLY_RESHARDABLE.set(True)
        try:
            return original(self, *args, **kwargs)
        finally:
            _IN_FULLY_RESHARDABLE.reset(token)

    return sharded_param_state_fully_reshardable


def _wraps_bucket_padding(original):
    """One wrapper factory for both targets of the bucket-padding patch (told apart by name)."""
    if original.__name__ == "get_parameter_state_dp_zero":
        return _padded_in_fully_reshardable(original)
    return _marks_fully_reshardable(original)


def _keeps_adam_step(original):
    @functools.wraps(original)
    def load_parameter_state_from_fully_reshardable(self, state_dict):
        state = self.optimizer.state
        steps = {p: st.pop("step") for p, st in state.items() if "step" in st}
        try:
            return original(self, state_dict)
        finally:
            for p, st in state.items():
                if p in steps:
                    st["step"] = steps[p]

    return load_parameter_state_from_fully_reshardable


def _own_step_tensors(original):
    @functools.wraps(original)
    def load_state_dict(self, state_dict):
        result = original(self, state_dict)
        for param_state in self.optimizer.state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()
        return result

    return load_state_dict


OPTIMIZER_PATCHES = (
    Replace(
        name="foreach_l2_norm",
        replacements=(("megatron.core.optimizer.clip_grads:l2_norm_impl", foreach_l2_norm),),
        only_if=_is_local_l2_norm,
        reason="without TE / apex the grad norm takes one torch.norm and one host sync per "
               "tensor; torch._foreach_norm gives the same norm in a few kernels",
    ),
    Replace(
        name="foreach_scale",
        replacements=(("megatron.core.optimizer.clip_grads:multi_tensor_scale_impl",
                       foreach_scale),
                      ("megatron.core.optimizer.optimizer:multi_tensor_scale_impl",
                       foreach_scale)),
        only_if=_is_local_scale,
        reason="without TE / apex clipping and the main -> model copy run one kernel per "
               "tensor; torch._foreach_mul_ / _foreach_copy_ give the same values",
    ),
    Replace(
        name="distributed_optimizer_foreach_copy",
        replacements=((f"{_DISTRIB}._copy_main_params_to_model_params",
                       _foreach_main_to_model_copy),),
        wraps=True,
        reason="the main -> parameter-buffer copy after each step runs one copy per tensor; "
               "one _foreach_copy_ over views computed once (FSDP, precision-aware, FP8: "
               "megatron-core's copy)",
    ),
    Replace(
        name="fully_reshardable_bucket_padding",
        replacements=((f"{_DISTRIB}.get_parameter_state_dp_zero", _wraps_bucket_padding),
                      (f"{_DISTRIB}.sharded_param_state_fully_reshardable",
                       _wraps_bucket_padding)),
        wraps=True,
        reason="bug: the fully_reshardable checkpoint state drops the padding between DDP "
               "buckets and saves later buckets' Adam state shifted; it is put back",
    ),
    Replace(
        name="fully_reshardable_load_keeps_adam_step",
        replacements=((f"{_DISTRIB}.load_parameter_state_from_fully_reshardable",
                       _keeps_adam_step),),
        wraps=True,
        reason="bug: loading copies torch Adam's 'step' from the loaded tensors, which hold "
               "none (KeyError); it is kept aside meanwhile",
    ),
    Replace(
        name="distributed_optimizer_own_step_tensors",
        replacements=((f"{_DISTRIB}.load_state_dict", _own_step_tensors),),
        wraps=True,
        reason="bug without TE / apex: load_state_dict gives every parameter one shared 'step' "
               "tensor, which fused Adam advances once per parameter; each gets its own",
    ),
)
