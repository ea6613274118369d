"""Single-process checkpoints: atomic, resumable, keeping the last k.

A checkpoint is the folder ``<save>/iter_<step:07d>`` holding ``state.pt`` (model, optimizer,
LR scheduler, RNG states, step, consumed samples, the resolved run config and a version stamp).
It is written under a temporary name and renamed when complete, then ``latest`` is replaced
atomically, so a crash never leaves a half-written checkpoint that resume would pick up.
Distributed (resharding) checkpoints replace this with megatron-core dist_checkpointing in a
later issue (TODO(#6)).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch

FORMAT_VERSION = 1
_ITER_RE = re.compile(r"^iter_(\d{7})$")


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
        if m and os.path.isfile(os.path.join(save, name, "state.pt")):
            found.append((int(m.group(1)), os.path.join(save, name)))
    return sorted(found)


def save_checkpoint(save: str, step: int, state: dict, keep_last: int = 0) -> str:
    os.makedirs(save, exist_ok=True)
    final = os.path.join(save, f"iter_{step:07d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save({"format_version": FORMAT_VERSION, "step": step, **state}, os.path.join(tmp, "state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = os.path.join(save, "latest.tmp")
    with open(latest_tmp, "w") as f:
        f.write(f"{step}\n")
    os.replace(latest_tmp, os.path.join(save, "latest"))
    if keep_last > 0:
        for _, old in checkpoint_dirs(save)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest_checkpoint(save: str) -> Optional[dict]:
    """The newest complete checkpoint's state, or None when there is none."""
    found = checkpoint_dirs(save)
    if not found:
        return None
    step, path = found[-1]
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path}: format_version {state.get('format_version')!r}, "
                         f"this code reads {FORMAT_VERSION}")
    return state
