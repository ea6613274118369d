"""The one boundary to megatron-core's internals: every change we make to megatron-core, declared.

Nothing else in ``megatron_transmamba`` imports a private megatron-core name (a name or module
starting with ``_``) or changes megatron-core's behaviour (assigns to its modules, classes or
objects' methods); ``tests/megatron_adapter/test_boundary.py`` scans the package for both, and
for ``parallel_state`` (read only here and in ``parallel/initialize.py``). What the rest
needs lives here as declared patches (``PATCHES``), each with its name, targets, reason,
whether it is CPU-only and the megatron-core releases it was checked against:

- ``apply()`` (called by ``parallel.initialize.initialize_distributed``) applies every patch
  for this machine once, in order: all of them without CUDA, all but the CPU-only ones with
  CUDA. Patches marked ``on_demand`` are applied by the code that needs them
  (``apply_on_demand``). Calling it again does nothing.
- ``remove()`` undoes them in reverse order, putting back the very objects that were there;
  ``suspended(*names)`` does so for a block (tests compare against megatron-core as is).
- Version policy: before applying, the installed megatron-core release must be one every
  patch to apply lists in ``versions``; otherwise ``apply`` raises
  ``UncheckedMegatronCoreError`` (one line naming the release and how many patches to review)
  and changes nothing. ``MEGATRON_TRANSMAMBA_UNCHECKED_MEGATRON_CORE=warn`` turns that into a
  warning, for reviewing an upgrade (run the tests, then add the release to the patches).
- ``inventory_table()`` / ``python -m megatron_transmamba.megatron_adapter`` list them.

Subclasses that re-implement megatron-core methods (the dataset builder, ``LanguageModule``)
and calls of private megatron-core methods live here too, listed as ``Override`` and
``PrivateCall`` entries: megatron-core itself is not changed by them.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from megatron_transmamba.megatron_adapter.checkpointing import CHECKPOINT_PATCHES
from megatron_transmamba.megatron_adapter.compile import COMPILE_PATCHES
from megatron_transmamba.megatron_adapter.cpu import CPU_PATCHES
from megatron_transmamba.megatron_adapter.optimizer import OPTIMIZER_PATCHES
from megatron_transmamba.megatron_adapter.patching import (CHECKED_VERSIONS, Override, Patch,
                                                           PrivateCall)

UNCHECKED_ENV = "MEGATRON_TRANSMAMBA_UNCHECKED_MEGATRON_CORE"
_LANGUAGE_MODULE = ("megatron.core.models.common.language_module.language_module:"
                    "LanguageModule")
_ADAPTER = "megatron_transmamba.megatron_adapter"

OVERRIDES: Tuple[Patch, ...] = (
    Override(
        name="blended_dataset_without_process_group",
        method="megatron.core.datasets.blended_megatron_dataset_builder:"
               "BlendedMegatronDatasetBuilder.build_generic_dataset",
        subclass=f"{_ADAPTER}.datasets:DatasetBuilder",
        reason="BlendedDataset calls torch.distributed.get_rank() on an index-cache miss; "
               "without a process group its blending indices are built in memory",
    ),
    Override(
        name="language_module_attention_backend",
        method=f"{_LANGUAGE_MODULE}._set_attention_backend",
        subclass=f"{_ADAPTER}.language_module:LanguageModuleOnAnyDevice",
        reason="sets Transformer Engine's NVTE_*_ATTN variables; our '*' layers choose their "
               "attention in models/specs.py",
    ),
    Override(
        name="language_module_tied_embedding_setup",
        method=f"{_LANGUAGE_MODULE}.setup_embeddings_and_output_layer",
        subclass=f"{_ADAPTER}.language_module:LanguageModuleOnAnyDevice",
        reason="reads the stage from the parallel state and moves the tied weight to CUDA "
               "(gloo on CPU cannot); ours reads pre_process / post_process, keeps the device",
    ),
    PrivateCall(
        name="selective_recompute_core_attention",
        method="megatron.core.transformer.attention:Attention._checkpointed_attention_forward",
        caller=f"{_ADAPTER}.attention:checkpointed_core_attention",
        reason="training.recompute='selective' (core_attn) of our fused-RoPE SelfAttention "
               "reuses megatron-core's private checkpointed core attention",
    ),
)

PATCHES: Tuple[Patch, ...] = (OPTIMIZER_PATCHES + CHECKPOINT_PATCHES + COMPILE_PATCHES
                              + OVERRIDES + CPU_PATCHES)
_BY_NAME: Dict[str, Patch] = {patch.name: patch for patch in PATCHES}
assert len(_BY_NAME) == len(PATCHES), "patch names must be unique"

# name -> what its apply() returned (None: declared but not needed here), in applying order
_applied: Dict[str, object] = {}


class UncheckedMegatronCoreError(RuntimeError):
    """The installed megatron-core is not a release the patches to apply were checked against."""


def megatron_core_version() -> str:
    import megatron.core

    return megatron.core.__version__.partition("+")[0]


def inventory() -> Tuple[Patch, ...]:
    """Every declared patch and override, in applying order."""
    return PATCHES


def applied() -> List[str]:
    """The patches in force in this process (applied, and changing something here)."""
    return [name for name, record in _applied.items() if record is not None]


def check_version(patches: Iterable[Patch]) -> None:
    """Raise UncheckedMegatronCoreError (or warn, with the environment variable) when the
    installed megatron-core is not a release every one of ``patches`` was checked against."""
    patches = list(patches)
    version = megatron_core_version()
    unchecked = [patch.name for patch in patches if version not in patch.versions]
    if not unchecked:
        return
    checked = sorted({v for patch in patches for v in patch.versions})
    message = (f"megatron-core {version} is not a release the megatron_adapter patches were "
               f"checked against ({', '.join(checked)}): review the {len(unchecked)} patches "
               f"that `python -m {_ADAPTER}` lists and add {version} to their versions, or set "
               f"{UNCHECKED_ENV}=warn to apply them unchecked")
    if os.environ.get(UNCHECKED_ENV) == "warn":
        warnings.warn(message, stacklevel=3)
        return
    raise UncheckedMegatronCoreError(message)


def _apply(patches: List[Patch]) -> None:
    todo = [patch for patch in patches if patch.name not in _applied]
    if not todo:
        return
    check_version(todo)
    for patch in todo:
        _applied[patch.name] = patch.apply()


def apply(cuda: Optional[bool] = None) -> List[str]:
    """Apply, once, every patch that is not on demand: the CPU-only ones only without CUDA
    (``cuda``: whether this process uses CUDA; default ``torch.cuda.is_available()``). Returns
    the names of the patches in force."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    _apply([patch for patch in PATCHES
            if patch.on_demand is None and not (patch.cpu_only and cuda)])
    return applied()


def apply_on_demand(name: str) -> None:
    """Apply the on-demand patch ``name`` once (its ``on_demand`` says who needs it)."""
    patch = _BY_NAME[name]
    if patch.on_demand is None:
        raise ValueError(f"{name} is applied by megatron_adapter.apply(), not on demand")
    _apply([patch])


def remove(names: Optional[Iterable[str]] = None) -> None:
    """Undo the applied patches (default all), newest first: every target holds again the very
    object it held before."""
    wanted = set(_applied if names is None else names)
    for name in reversed(list(_applied)):
        if name in wanted:
            record = _applied.pop(name)
            if record is not None:
                _BY_NAME[name].remove(record)


@contextlib.contextmanager
def suspended(*names: str):
    """megatron-core without the applied patches ``names`` inside the block."""
    was_applied = [name for name in _applied if name in names]
    remove(was_applied)
    try:
        yield
    finally:
        _apply([_BY_NAME[name] for name in was_applied])


def _yes_no(patch: Patch) -> str:
    text = "yes" if patch.cpu_only else "no"
    return f"{text} (on demand: {patch.on_demand})" if patch.on_demand else text


def inventory_table() -> str:
    """The inventory as a markdown table: name | target | reason | CPU-only | versions."""
    lines = ["| name | target | reason | CPU-only | versions |", "|---|---|---|---|---|"]
    for patch in PATCHES:
        cells = (patch.name, patch.target, patch.reason, _yes_no(patch),
                 ", ".join(patch.versions))
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


__all__ = ["CHECKED_VERSIONS", "OVERRIDES", "PATCHES", "UNCHECKED_ENV",
           "UncheckedMegatronCoreError", "applied", "apply", "apply_on_demand", "check_version",
           "inventory", "inventory_table", "megatron_core_version", "remove", "suspended"]
