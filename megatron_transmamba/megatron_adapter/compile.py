"""What torch.compile needs of megatron-core 0.16 to trace a layer without a graph break.

``RowParallelLinear.forward`` passes ``tp_group=None`` to its matmul, and
``megatron.core.utils.get_tensor_model_parallel_group_if_none`` then calls ``warnings.warn``
on rank 0, which Dynamo cannot trace. In compiled code only, it is replaced by the same function
without that (deprecation) warning; eager code and megatron-core's function are unchanged.
Applied on demand by ``training/graphs.py`` when layers are compiled.
"""

from __future__ import annotations

import warnings

import torch

from megatron_transmamba.megatron_adapter.patching import Polyfill

# Whether the stand-in is in force (the patch applied); off, it warns as megatron-core does.
polyfill_active = False


def _tp_group_if_none():
    from megatron.core import parallel_state

    def get_tensor_model_parallel_group_if_none(tp_group, is_expert=False,
                                                check_initialized=True):
        if not torch.distributed.is_initialized():
            return None
        if not parallel_state.is_initialized() or tp_group is not None:
            return tp_group
        if not polyfill_active and torch.distributed.get_rank() == 0:   # megatron-core's own
            warnings.warn("Warning: tp_group is None, using default tp group. Passing tp_group "
                          "will be mandatory soon", DeprecationWarning, stacklevel=2)
        if is_expert:
            return parallel_state.get_expert_tensor_parallel_group(
                check_initialized=check_initialized)
        return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)

    return get_tensor_model_parallel_group_if_none


COMPILE_PATCHES = (
    Polyfill(
        name="compiled_tp_group_without_warning",
        function="megatron.core.utils:get_tensor_model_parallel_group_if_none",
        make=_tp_group_if_none, flag=f"{__name__}:polyfill_active", on_demand="training.compile",
        reason="RowParallelLinear passes tp_group=None and the lookup warns (warnings.warn), "
               "which Dynamo cannot trace: a graph break in every compiled layer",
    ),
)
