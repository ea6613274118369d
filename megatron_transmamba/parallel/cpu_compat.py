"""Run megatron-core 0.16 on CPU-only machines (gloo), for development and CI.

megatron-core assumes a GPU in a few places on the code path we use: it allocates buffers
with ``device=torch.cuda.current_device()``, calls ``torch.cuda.synchronize()``, keeps its
tensor-parallel RNG states with ``torch.cuda.get_rng_state``, creates tensors with a
literal ``device="cuda"`` and checks ``param.type() == "torch.cuda.FloatTensor"``. On a
machine without CUDA each of these raises. ``apply_cpu_compat()`` patches exactly those
sites, and nothing happens when CUDA is available: it returns at once, so GPU runs use
megatron-core untouched. The patches are narrow and all listed in ``PATCHES``:

- ``CudaNames``: in one megatron module, the global name ``torch`` is replaced by a view of
  torch whose ``cuda`` attribute answers the listed names with CPU stand-ins (the device is
  ``cpu``, synchronize is a no-op, the "CUDA" RNG is the CPU generator, which is the one
  CPU tensors draw from). ``torch.cuda`` itself is never changed, for anyone.
- ``Constants``: string constants in one function's code are rewritten in place
  (``"cuda"`` -> ``"cpu"``, ``"torch.cuda.FloatTensor"`` -> ``"torch.FloatTensor"``), so
  every reference to the function sees the change.
- ``Replace``: one module attribute replaced by a CPU function.
- ``LogFilter``: one log message dropped that is a false alarm on CPU.

The shims are written against megatron-core 0.16.x and refuse any other version;
``tests/parallel/test_cpu_compat.py`` counts the CUDA calls in every megatron-core file on
our path and fails when a new one appears, so the table is reviewed on every upgrade.
"""

import importlib
import inspect
import logging
import types
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

SHIMMED_MEGATRON_CORE = "0.16"

_applied = False


# CPU stand-ins for torch.cuda attributes; a CudaNames patch exposes only those it lists.
def _current_device() -> torch.device:
    return torch.device("cpu")


def _synchronize(device=None) -> None:
    return None


def _get_rng_state(device="cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _manual_seed(seed: int) -> None:
    torch.manual_seed(seed)


_CPU_CUDA: Dict[str, Callable] = {
    "current_device": _current_device,
    "synchronize": _synchronize,
    "get_rng_state": _get_rng_state,
    "manual_seed": _manual_seed,
}


def _get_cuda_rng_state_cpu(device="cuda", clone: bool = False, graph_safe: bool = False):
    if graph_safe:
        raise RuntimeError("graph-safe (CUDA graph) RNG states need CUDA")
    return torch.get_rng_state()


def _set_cuda_rng_state_cpu(new_state: torch.Tensor, device=-1, graph_safe: bool = False):
    if graph_safe:
        raise RuntimeError("graph-safe (CUDA graph) RNG states need CUDA")
    torch.set_rng_state(new_state)


class _ModuleView(types.ModuleType):
    """A module whose listed attributes are overridden; everything else is the original's."""

    def __init__(self, wrapped: types.ModuleType, overrides: Dict[str, object]):
        super().__init__(wrapped.__name__, wrapped.__doc__)
        self.__dict__["_wrapped"] = wrapped
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self.__dict__["_wrapped"], name)


def _resolve(target: str) -> Tuple[object, str, object]:
    """'pkg.module:Class.attr' -> (owner, attribute name, value)."""
    module_name, _, qualname = target.partition(":")
    owner: object = importlib.import_module(module_name)
    *parents, name = qualname.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, name, inspect.getattr_static(owner, name)


@dataclass(frozen=True)
class CudaNames:
    """Answer ``torch.cuda.<name>`` with a CPU stand-in inside one module only."""

    module: str
    names: Tuple[str, ...]
    reason: str

    @property
    def target(self) -> str:
        return f"{self.module}: torch.cuda.{{{', '.join(self.names)}}}"

    def apply(self) -> None:
        module = importlib.import_module(self.module)
        if module.__dict__.get("torch") is not torch:
            raise RuntimeError(f"cpu_compat: {self.module} has no global `torch` to shim")
        cuda = _ModuleView(torch.cuda, {name: _CPU_CUDA[name] for name in self.names})
        module.torch = _ModuleView(torch, {"cuda": cuda})


def _rewrite_constants(code: types.CodeType, mapping: Dict[object, object]) -> types.CodeType:
    def rewrite(value):
        if isinstance(value, types.CodeType):
            return _rewrite_constants(value, mapping)
        if isinstance(value, tuple):
            return tuple(rewrite(v) for v in value)
        if isinstance(value, frozenset):
            return frozenset(rewrite(v) for v in value)
        if isinstance(value, str) and value in mapping:
            return mapping[value]
        return value

    return code.replace(co_consts=tuple(rewrite(c) for c in code.co_consts))


def _string_constants(code: types.CodeType) -> List[str]:
    found = []
    for value in code.co_consts:
        if isinstance(value, types.CodeType):
            found += _string_constants(value)
        elif isinstance(value, (tuple, frozenset)):
            found += [v for v in value if isinstance(v, str)]
        elif isinstance(value, str):
            found.append(value)
    return found


@dataclass(frozen=True)
class Constants:
    """Rewrite string constants inside one function's code (nested functions included)."""

    function: str
    mapping: Tuple[Tuple[str, str], ...]
    reason: str

    @property
    def target(self) -> str:
        pairs = ", ".join(f"{old!r} -> {new!r}" for old, new in self.mapping)
        return f"{self.function}: {pairs}"

    @property
    def module(self) -> str:
        return self.function.partition(":")[0]

    def apply(self) -> None:
        _, _, func = _resolve(self.function)
        func = inspect.unwrap(getattr(func, "__func__", func))  # staticmethod, decorators
        present = set(_string_constants(func.__code__))
        missing = [old for old, _ in self.mapping if old not in present]
        if missing:
            raise RuntimeError(f"cpu_compat: {self.function} no longer contains {missing}")
        func.__code__ = _rewrite_constants(func.__code__, dict(self.mapping))


@dataclass(frozen=True)
class Replace:
    """Replace one module attribute by a CPU implementation."""

    attribute: str
    replacement: Callable
    reason: str

    @property
    def target(self) -> str:
        return self.attribute

    @property
    def module(self) -> str:
        return self.attribute.partition(":")[0]

    def apply(self) -> None:
        owner, name, _ = _resolve(self.attribute)
        setattr(owner, name, self.replacement)


@dataclass(frozen=True)
class LogFilter:
    """Drop one message, known to be meaningless on CPU, from one megatron logger."""

    logger: str
    message: str
    reason: str

    @property
    def target(self) -> str:
        return f"logging.getLogger({self.logger!r}): {self.message!r}"

    @property
    def module(self) -> str:
        return self.logger  # megatron names its loggers after their modules

    def apply(self) -> None:
        message = self.message
        logging.getLogger(self.logger).addFilter(lambda record: record.getMessage() != message)


_CUDA_TO_CPU = (("cuda", "cpu"),)
_FLOAT_TENSOR = (("torch.cuda.FloatTensor", "torch.FloatTensor"),)

PATCHES: Tuple[object, ...] = (
    CudaNames(
        "megatron.core.tensor_parallel.random",
        ("get_rng_state", "manual_seed"),
        "CudaRNGStatesTracker.add and model_parallel_cuda_manual_seed seed the 'CUDA' RNG",
    ),
    Replace(
        "megatron.core.tensor_parallel.random:_get_cuda_rng_state",
        _get_cuda_rng_state_cpu,
        "CudaRNGStatesTracker.fork reads torch.cuda.default_generators",
    ),
    Replace(
        "megatron.core.tensor_parallel.random:_set_cuda_rng_state",
        _set_cuda_rng_state_cpu,
        "CudaRNGStatesTracker.fork writes torch.cuda.default_generators",
    ),
    LogFilter(
        "megatron.core.tensor_parallel.random",
        "CPU RNG state changed within GPU RNG context",
        "fork() warns when the CPU RNG moved inside it; on CPU the forked RNG is the CPU one",
    ),
    CudaNames(
        "megatron.core.tensor_parallel.layers",
        ("current_device",),
        "weights, biases and gather buffers of the parallel linears and embedding",
    ),
    CudaNames(
        "megatron.core.tensor_parallel.mappings",
        ("current_device",),
        "sequence-parallel all-gather / reduce-scatter output buffers",
    ),
    CudaNames(
        "megatron.core.utils",
        ("current_device",),
        "GlobalMemoryBuffer.get_tensor (sequence-parallel all-gather in the linears)",
    ),
    Constants(
        "megatron.core.utils:local_multi_tensor_l2_norm",
        _CUDA_TO_CPU,
        "the apex-free grad-norm kernel returns its result on device='cuda'",
    ),
    Constants(
        "megatron.core.transformer.utils:get_default_causal_mask",
        _CUDA_TO_CPU,
        "DotProductAttention builds the causal mask on 'cuda' when attention_mask is None",
    ),
    CudaNames(
        "megatron.core.distributed.param_and_grad_buffer",
        ("current_device",),
        "DDP's contiguous param / grad buffers",
    ),
    Constants(
        "megatron.core.optimizer.optimizer:MixedPrecisionOptimizer.__init__",
        _CUDA_TO_CPU,
        "found_inf / overflow buffer / unit loss scale (DistributedOptimizer's base class)",
    ),
    Constants(
        "megatron.core.optimizer.optimizer:FP32Optimizer.__init__",
        _CUDA_TO_CPU,
        "unit loss scale tensor",
    ),
    Constants(
        "megatron.core.optimizer.distrib_optimizer:"
        "DistributedOptimizer._build_model_and_main_param_groups",
        _FLOAT_TENSOR,
        "fp32 params are recognised by param.type() == 'torch.cuda.FloatTensor'",
    ),
    CudaNames(
        "megatron.core.optimizer.distrib_optimizer",
        ("current_device",),
        "DistributedOptimizer.load_state_dict allocates the shards' Adam state on the device",
    ),
    Constants(
        "megatron.core.optimizer.clip_grads:get_grad_norm_fp32",
        _CUDA_TO_CPU,
        "norm accumulators created on 'cuda'",
    ),
    Constants(
        "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32",
        _CUDA_TO_CPU + _FLOAT_TENSOR,
        "asserts grad.type() == 'torch.cuda.FloatTensor'; overflow buffer on 'cuda'",
    ),
    *(
        Constants(
            f"megatron.core.pipeline_parallel.schedules:{schedule}",
            _CUDA_TO_CPU,
            "total_num_tokens counter created on 'cuda'",
        )
        for schedule in (
            "forward_backward_no_pipelining",
            "forward_backward_pipelining_without_interleaving",
            "forward_backward_pipelining_with_interleaving",
        )
    ),
    CudaNames(
        "megatron.core.dist_checkpointing.strategies.filesystem_async",
        ("synchronize",),
        "dist_checkpointing save: preload_tensors syncs after its device-to-host copies",
    ),
    CudaNames(
        "megatron.core.dist_checkpointing.strategies.state_dict_saver",
        ("current_device",),
        "dist_checkpointing save: the failure flag broadcast after writing",
    ),
    Constants(
        "megatron.core.dist_checkpointing.strategies.state_dict_saver:verify_global_md_reuse",
        _CUDA_TO_CPU,
        "dist_checkpointing save with cached plans: the all-reduced reuse flag on 'cuda'",
    ),
    CudaNames(
        "megatron.core.dist_checkpointing.strategies.async_utils",
        ("current_device", "synchronize"),
        "asynchronous save: the all-reduced 'writer done' flags and the sync before forking",
    ),
    CudaNames(
        "megatron.core.pipeline_parallel.p2p_communication",
        ("current_device", "synchronize"),
        "receive buffers and shape exchange on the current device; sync after batched p2p",
    ),
)


def apply_cpu_compat() -> bool:
    """Patch megatron-core for CPU-only use; return True when the patches are active.

    A no-op (returns False) when CUDA is available. Idempotent. Raises RuntimeError for a
    megatron-core version other than the one the shims were written for.
    """
    global _applied
    if torch.cuda.is_available():
        return False
    import megatron.core

    version = megatron.core.__version__
    if version.split(".")[:2] != SHIMMED_MEGATRON_CORE.split("."):
        raise RuntimeError(
            f"megatron_transmamba.parallel.cpu_compat was written for megatron-core "
            f"{SHIMMED_MEGATRON_CORE}.x, found {version}: review every patch in "
            f"cpu_compat.PATCHES against the new release (tests/parallel/test_cpu_compat.py "
            f"lists the CUDA calls per file) before running on CPU"
        )
    if _applied:
        return True
    for patch in PATCHES:
        patch.apply()
    _applied = True
    return True
