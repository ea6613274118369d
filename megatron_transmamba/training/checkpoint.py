"""Training checkpoints: atomic, resumable, keeping the last k, for any number of processes.

A checkpoint is the folder ``<save>/iter_<step:07d>``. Every rank writes its own
``rank_<r:05d>.pt`` (its model shard, optimizer, LR scheduler, RNG states, step, consumed
samples and the resolved run config) into ``iter_<step>.tmp``; after a barrier rank 0 adds
``layout.json`` (world size, tensor / pipeline parallel sizes, format version) and renames the
folder, then replaces ``latest``. A folder without ``layout.json`` is never picked up, so a
crash never leaves a half-written checkpoint that resume would read. Resuming needs the same
world size and layout; checkpoints that reshard between layouts are megatron-core
dist_checkpointing, TODO(#6). Format 1 (one ``state.pt``, single process) still loads.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

FORMAT_VERSION = 2
LAYOUT_FILE = "layout.json"
_ITER_RE = re.compile(r"^iter_(\d{7})$")
_LAYOUT_KEYS = ("world_size", "tensor_model_parallel_size", "pipeline_model_parallel_size")


def _rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank_file(path: str, rank: int) -> str:
    return os.path.join(path, f"rank_{rank:05d}.pt")


def rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_dirs(save: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``save`` as (step, path), oldest first."""
    if not os.path.isdir(save):
        return []
    found = []
    for name in os.listdir(save):
        m = _ITER_RE.match(name)
        path = os.path.join(save, name)
        if m and (os.path.isfile(os.path.join(path, LAYOUT_FILE))
                  or os.path.isfile(os.path.join(path, "state.pt"))):        # format 1
            found.append((int(m.group(1)), path))
    return sorted(found)


def save_checkpoint(save: str, step: int, state: dict, keep_last: int = 0,
                    layout: Optional[dict] = None) -> str:
    """Write this rank's ``state``; every rank of the job calls it (it has barriers).
    ``layout``: the parallel layout, stored for resume to check (world size is added)."""
    rank, world = _rank_and_world()
    final = os.path.join(save, f"iter_{step:07d}")
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(save, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    torch.save({"format_version": FORMAT_VERSION, "step": step, **state}, _rank_file(tmp, rank))
    _barrier()
    if rank == 0:
        with open(os.path.join(tmp, LAYOUT_FILE), "w") as f:
            json.dump({"format_version": FORMAT_VERSION, **(layout or {}), "world_size": world},
                      f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = os.path.join(save, "latest.tmp")
        with open(latest_tmp, "w") as f:
            f.write(f"{step}\n")
        os.replace(latest_tmp, os.path.join(save, "latest"))
        if keep_last > 0:
            for _, old in checkpoint_dirs(save)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_latest_checkpoint(save: str, layout: Optional[dict] = None) -> Optional[dict]:
    """This rank's state from the newest complete checkpoint (rank 0's choice, so every rank
    reads the same step), or None when there is none. Raises ValueError when the checkpoint
    was written by another layout (``layout`` as given to ``save_checkpoint``)."""
    rank, world = _rank_and_world()
    found = checkpoint_dirs(save)
    choice = [found[-1][1] if found else None]
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    path = choice[0]
    if path is None:
        return None
    current = {**(layout or {}), "world_size": world}
    layout_path = os.path.join(path, LAYOUT_FILE)
    if os.path.isfile(layout_path):
        with open(layout_path) as f:
            saved = json.load(f)
        file = _rank_file(path, rank)
    else:                                                   # format 1: one process, no layout
        saved, file = {"format_version": 1, "world_size": 1}, os.path.join(path, "state.pt")
    different = {key: (saved.get(key, 1), current[key]) for key in _LAYOUT_KEYS
                 if key in current and saved.get(key, 1) != current[key]}
    if different:
        names = ", ".join(f"{key} {old} (this run: {new})" for key, (old, new) in different.items())
        raise ValueError(f"checkpoint {path} was saved with {names}: resume with the same world "
                         "size and parallel layout (checkpoints that reshard are issue #6)")
    state = torch.load(file, map_location="cpu", weights_only=False)
    if state.get("format_version") not in (1, FORMAT_VERSION):
        raise ValueError(f"checkpoint {path}: format_version {state.get('format_version')!r}, "
                         f"this code reads 1 and {FORMAT_VERSION}")
    return state
