"""megatron-core 0.16 on CPU-only machines (gloo), for development and CI: the CPU-only patches.

megatron-core assumes a GPU in a few places on the code path we use: it allocates buffers
with ``device=torch.cuda.current_device()``, calls ``torch.cuda.synchronize()``, keeps its
tensor-parallel RNG states with ``torch.cuda.get_rng_state``, creates tensors with a
literal ``device="cuda"`` and checks ``param.type() == "torch.cuda.FloatTensor"``. On a
machine without CUDA each of these raises. ``CPU_PATCHES`` changes exactly those sites; they
are applied only when CUDA is absent (``cpu_only``), so GPU runs use these functions
untouched. ``tests/megatron_adapter/test_cpu_patches.py`` counts the CUDA calls in every
megatron-core file on our path and fails when a new one appears, so the table is reviewed on
every upgrade.
"""

from __future__ import annotations

from typing import Tuple

import torch

from megatron_transmamba.megatron_adapter.patching import (Constants, CudaNames, LogFilter,
                                                           Patch, Replace)


# CPU stand-ins for torch.cuda attributes; a CudaNames patch exposes only those it lists.
def _current_device() -> torch.device:
    return torch.device("cpu")


def _synchronize(device=None) -> None:
    return None


def _get_rng_state(device="cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _manual_seed(seed: int) -> None:
    torch.manual_seed(seed)


_STAND_INS = (("current_device", _current_device), ("synchronize", _synchronize),
              ("get_rng_state", _get_rng_state), ("manual_seed", _manual_seed))


def _get_cuda_rng_state_cpu(device="cuda", clone: bool = False, graph_safe: bool = False):
    if graph_safe:
        raise RuntimeError("graph-safe (CUDA graph) RNG states need CUDA")
    return torch.get_rng_state()


def _set_cuda_rng_state_cpu(new_state: torch.Tensor, device=-1, graph_safe: bool = False):
    if graph_safe:
        raise RuntimeError("graph-safe (CUDA graph) RNG states need CUDA")
    torch.set_rng_state(new_state)


def _cuda_names(name: str, module: str, names: Tuple[str, ...], reason: str) -> CudaNames:
    return CudaNames(name=name, reason=reason, cpu_only=True, module=module, names=names,
                     stand_ins=_STAND_INS)


def _constants(name: str, function: str, mapping, reason: str) -> Constants:
    return Constants(name=name, reason=reason, cpu_only=True, function=function, mapping=mapping)


_CUDA_TO_CPU = (("cuda", "cpu"),)
_FLOAT_TENSOR = (("torch.cuda.FloatTensor", "torch.FloatTensor"),)
_SCHEDULES = "megatron.core.pipeline_parallel.schedules"

CPU_PATCHES: Tuple[Patch, ...] = (
    _cuda_names(
        "cpu_rng_seed", "megatron.core.tensor_parallel.random", ("get_rng_state", "manual_seed"),
        "CudaRNGStatesTracker.add and model_parallel_cuda_manual_seed seed the 'CUDA' RNG",
    ),
    Replace(
        name="cpu_rng_get_state", cpu_only=True,
        replacements=(("megatron.core.tensor_parallel.random:_get_cuda_rng_state",
                       _get_cuda_rng_state_cpu),),
        reason="CudaRNGStatesTracker.fork reads torch.cuda.default_generators",
    ),
    Replace(
        name="cpu_rng_set_state", cpu_only=True,
        replacements=(("megatron.core.tensor_parallel.random:_set_cuda_rng_state",
                       _set_cuda_rng_state_cpu),),
        reason="CudaRNGStatesTracker.fork writes torch.cuda.default_generators",
    ),
    LogFilter(
        name="cpu_rng_fork_warning", cpu_only=True,
        logger="megatron.core.tensor_parallel.random",
        message="CPU RNG state changed within GPU RNG context",
        reason="fork() warns when the CPU RNG moved inside it; on CPU the forked RNG is the "
               "CPU one",
    ),
    _cuda_names(
        "cpu_linear_buffers", "megatron.core.tensor_parallel.layers", ("current_device",),
        "weights, biases and gather buffers of the parallel linears and embedding",
    ),
    _cuda_names(
        "cpu_sequence_parallel_buffers", "megatron.core.tensor_parallel.mappings",
        ("current_device",),
        "sequence-parallel all-gather / reduce-scatter output buffers",
    ),
    _cuda_names(
        "cpu_global_memory_buffer", "megatron.core.utils", ("current_device",),
        "GlobalMemoryBuffer.get_tensor (sequence-parallel all-gather in the linears)",
    ),
    _constants(
        "cpu_local_l2_norm", "megatron.core.utils:local_multi_tensor_l2_norm", _CUDA_TO_CPU,
        "the apex-free grad-norm kernel returns its result on device='cuda'",
    ),
    _constants(
        "cpu_causal_mask", "megatron.core.transformer.utils:get_default_causal_mask",
        _CUDA_TO_CPU,
        "DotProductAttention builds the causal mask on 'cuda' when attention_mask is None",
    ),
    _cuda_names(
        "cpu_ddp_buffers", "megatron.core.distributed.param_and_grad_buffer",
        ("current_device",),
        "DDP's contiguous param / grad buffers",
    ),
    _constants(
        "cpu_mixed_precision_optimizer",
        "megatron.core.optimizer.optimizer:MixedPrecisionOptimizer.__init__", _CUDA_TO_CPU,
        "found_inf / overflow buffer / unit loss scale (DistributedOptimizer's base class)",
    ),
    _constants(
        "cpu_fp32_optimizer", "megatron.core.optimizer.optimizer:FP32Optimizer.__init__",
        _CUDA_TO_CPU,
        "unit loss scale tensor",
    ),
    _constants(
        "cpu_fp32_param_check",
        "megatron.core.optimizer.distrib_optimizer:"
        "DistributedOptimizer._build_model_and_main_param_groups",
        _FLOAT_TENSOR,
        "fp32 params are recognised by param.type() == 'torch.cuda.FloatTensor'",
    ),
    _cuda_names(
        "cpu_distributed_optimizer_state", "megatron.core.optimizer.distrib_optimizer",
        ("current_device",),
        "DistributedOptimizer.load_state_dict allocates the shards' Adam state on the device",
    ),
    _constants(
        "cpu_grad_norm", "megatron.core.optimizer.clip_grads:get_grad_norm_fp32", _CUDA_TO_CPU,
        "norm accumulators created on 'cuda'",
    ),
    _constants(
        "cpu_clip_grad", "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32",
        _CUDA_TO_CPU + _FLOAT_TENSOR,
        "asserts grad.type() == 'torch.cuda.FloatTensor'; overflow buffer on 'cuda'",
    ),
    _constants(
        "cpu_schedule_no_pipelining", f"{_SCHEDULES}:forward_backward_no_pipelining",
        _CUDA_TO_CPU, "total_num_tokens counter created on 'cuda'",
    ),
    _constants(
        "cpu_schedule_1f1b", f"{_SCHEDULES}:forward_backward_pipelining_without_interleaving",
        _CUDA_TO_CPU, "total_num_tokens counter created on 'cuda'",
    ),
    _constants(
        "cpu_schedule_interleaved", f"{_SCHEDULES}:forward_backward_pipelining_with_interleaving",
        _CUDA_TO_CPU, "total_num_tokens counter created on 'cuda'",
    ),
    _cuda_names(
        "cpu_checkpoint_preload", "megatron.core.dist_checkpointing.strategies.filesystem_async",
        ("synchronize",),
        "dist_checkpointing save: preload_tensors syncs after its device-to-host copies",
    ),
    _cuda_names(
        "cpu_checkpoint_failure_flag",
        "megatron.core.dist_checkpointing.strategies.state_dict_saver", ("current_device",),
        "dist_checkpointing save: the failure flag broadcast after writing",
    ),
    _constants(
        "cpu_checkpoint_plan_reuse",
        "megatron.core.dist_checkpointing.strategies.state_dict_saver:verify_global_md_reuse",
        _CUDA_TO_CPU,
        "dist_checkpointing save with cached plans: the all-reduced reuse flag on 'cuda'",
    ),
    _cuda_names(
        "cpu_async_save", "megatron.core.dist_checkpointing.strategies.async_utils",
        ("current_device", "synchronize"),
        "asynchronous save: the all-reduced 'writer done' flags and the sync before forking",
    ),
    _cuda_names(
        "cpu_p2p", "megatron.core.pipeline_parallel.p2p_communication",
        ("current_device", "synchronize"),
        "receive buffers and shape exchange on the current device; sync after batched p2p",
    ),
)
