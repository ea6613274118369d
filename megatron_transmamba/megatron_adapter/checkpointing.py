"""The dist_checkpointing writers' results queue: started so that a save survives SIGTERM.

megatron-core's asynchronous and multi-process ``torch_dist`` writers report through one queue
served by a ``multiprocessing`` Manager, which ``filesystem_async._get_write_results_queue``
starts on first use with the spawn method. A SIGTERM sent to the whole job (SLURM preemption,
torchrun passing it on) kills that Manager too, and the save the trainer then makes fails. The
patched function starts it once per process with SIGTERM ignored; without CUDA with fork, since
spawn re-imports the entry script (seconds per rank). megatron-core 0.16 has no public way to
hand the writers a queue.
"""

from __future__ import annotations

import signal

import torch

from megatron_transmamba.megatron_adapter.patching import Replace

_queue = None


def _ignore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def write_results_queue():
    """The writers' results queue of this process (a Manager proxy, which keeps it alive)."""
    global _queue
    if _queue is None:
        import multiprocessing
        from multiprocessing.managers import SyncManager

        context = multiprocessing.get_context("spawn" if torch.cuda.is_available() else "fork")
        manager = SyncManager(ctx=context)
        manager.start(_ignore_sigterm)
        _queue = manager.Queue()
    return _queue


CHECKPOINT_PATCHES = (
    Replace(
        name="sigterm_proof_write_queue",
        replacements=(("megatron.core.dist_checkpointing.strategies.filesystem_async:"
                       "_get_write_results_queue", write_results_queue),),
        reason="the checkpoint writers' results Manager must outlive a SIGTERM sent to the "
               "whole job, which must still save; fork instead of spawn without CUDA",
    ),
)
