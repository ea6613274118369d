"""Start and stop torch.distributed and megatron-core's model-parallel state.

``initialize_distributed`` is the one entry point for every process: under torchrun it reads
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, and without them it runs as a
single process on a free localhost port. With CUDA it uses NCCL on ``cuda:LOCAL_RANK``;
without CUDA gloo on the CPU. Before anything else of megatron-core runs it applies the
``megatron_adapter`` patches (the CPU-only ones only without CUDA), once per process.
The layout is checked before any rendezvous, so a bad layout fails on every rank at once
instead of hanging in a collective, and the process group gets a finite timeout.
``DistributedInfo.process_groups`` is the one place the model and the schedules get their
process groups from (``model_process_groups``); modules never read megatron's globals.
"""

import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_transmamba import megatron_adapter

DEFAULT_TIMEOUT_MINUTES = 10

_initializations = 0  # per process; every rank initializes equally often


@dataclass(frozen=True)
class DistributedInfo:
    """What ``initialize_distributed`` set up for this process."""

    rank: int
    world_size: int
    local_rank: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    data_parallel_size: int
    device: torch.device
    backend: str
    context_parallel_size: int = 1
    process_groups: Any = None
    """megatron-core ``ProcessGroupCollection`` (tp, cp, pp, embd, pos_embd, dp, dp_cp, mp)."""


def find_free_port() -> int:
    """A TCP port on localhost that was free a moment ago (the usual race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def validate_layout(
    world_size: int, tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
    context_parallel_size: int = 1,
) -> int:
    """Return the data-parallel size, or raise ValueError naming the config fields."""
    tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    if tp < 1 or pp < 1 or cp < 1:
        raise ValueError(
            f"parallel.tensor_model_parallel_size ({tp}), "
            f"parallel.pipeline_model_parallel_size ({pp}) and "
            f"parallel.context_parallel_size ({cp}) must be >= 1"
        )
    if world_size % (tp * pp * cp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by "
            f"parallel.tensor_model_parallel_size ({tp}) x "
            f"parallel.pipeline_model_parallel_size ({pp}) x "
            f"parallel.context_parallel_size ({cp}) = {tp * pp * cp}; "
            f"launch a multiple of {tp * pp * cp} processes or change the layout"
        )
    return world_size // (tp * pp * cp)


MODEL_PROCESS_GROUPS = ("tp", "cp", "pp", "embd", "pos_embd", "dp", "dp_cp", "mp")


def model_process_groups():
    """The process groups the model, megatron-core's schedules and finalize_model_grads use,
    as a ``ProcessGroupCollection`` built from megatron's parallel state."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups(required_pgs=list(MODEL_PROCESS_GROUPS))


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    context_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
) -> DistributedInfo:
    """Initialize torch.distributed, megatron-core's parallel state and all RNGs.

    Seeds follow Megatron-LM: ``seed + 100 * pipeline rank`` for random / numpy / torch, and
    ``model_parallel_cuda_manual_seed`` for the tensor-parallel RNG tracker (which adds its
    own per-tensor-parallel-rank offset).
    """
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized; call destroy_distributed()")

    under_launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ["RANK"]) if under_launcher else 0
    world_size = int(os.environ["WORLD_SIZE"]) if under_launcher else 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if under_launcher else 0
    data_parallel_size = validate_layout(
        world_size, tensor_model_parallel_size, pipeline_model_parallel_size,
        context_parallel_size
    )

    # Imported after the layout check, so a bad layout fails before megatron's slow import.
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    megatron_adapter.apply(cuda=device.type == "cuda")

    if under_launcher:
        init_method = "env://"
    else:
        init_method = f"tcp://127.0.0.1:{find_free_port()}"
    timeout = timedelta(minutes=timeout_minutes)
    store, rank, world_size = next(dist.rendezvous(init_method, rank, world_size, timeout=timeout))
    # torchrun's store outlives destroy_process_group, and a new default group reuses the old
    # group names: without a fresh prefix, gloo would read the previous group's addresses.
    global _initializations
    _initializations += 1
    store = dist.PrefixStore(f"megatron_transmamba/{_initializations}", store)
    dist.init_process_group(
        backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout
    )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        distributed_timeout_minutes=max(1, round(timeout_minutes)),
    )

    pipeline_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(pipeline_seed)
    np.random.seed(pipeline_seed)
    torch.manual_seed(pipeline_seed)
    model_parallel_cuda_manual_seed(pipeline_seed)

    return DistributedInfo(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        data_parallel_size=data_parallel_size,
        context_parallel_size=context_parallel_size,
        device=device,
        backend=backend,
        process_groups=model_process_groups(),
    )


def destroy_distributed() -> None:
    """Undo ``initialize_distributed`` so a process (a test) can initialize again."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    """Whether megatron's model-parallel state is set up in this process (by
    ``initialize_distributed``, or by a caller of megatron-core directly): what a tool that
    needs one process group asks before setting one up."""
    from megatron.core import parallel_state

    return parallel_state.model_parallel_is_initialized()
