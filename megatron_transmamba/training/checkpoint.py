"""Training checkpoints: megatron-core dist_checkpointing, atomic, verified, resharding.

A checkpoint is the folder ``<save>/iter_<step:07d>`` in megatron-core's ``torch_dist`` format
(DESIGN section 4): the model's per-component sharded tensors, keyed by global layer index and
component (``layers.3.mixer.in_proj.weight.z``), the optimizer state in megatron-core's
``fully_reshardable`` form (one fp32 copy, exp_avg and exp_avg_sq per model tensor), the RNG
states of every rank (a ``ShardedObject`` over PP x TP x DP), and in the common part the LR
scheduler, step, consumed samples and the run config. Tensors are stored whole, so a
checkpoint loads at any TP x PP x DP layout that divides the model. All ranks write into
``iter_<step>.tmp``; once every rank is done (after the writer processes, for an asynchronous
save) the ranks checksum the files, rank 0 writes ``checkpoint.json`` (format version,
step, tokens seen, layout, config and every file's size and CRC-32), renames the folder and
updates ``latest``. Only renamed folders count, so a crash never leaves a checkpoint that
resume would read; resume checks sizes and checksums and moves a damaged checkpoint aside to
``iter_<step>.corrupt`` before taking the previous one. Only this format (3) is read; a folder
of an older one (``layout.json`` or ``state.pt``) or another ``format_version`` is an error.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import random
import re
import shutil
import zlib
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

FORMAT_VERSION = 3
INFO_FILE = "checkpoint.json"
# The files that marked a complete checkpoint of the older formats, which are no longer read:
# recognised so that resume names such a folder instead of starting afresh beside it.
_OLD_FORMAT_FILES = (("layout.json", 2), ("state.pt", 1))
_ITER_RE = re.compile(r"^iter_(\d{7})$")
# Every process (not only DP rank 0) gets the whole optimizer state while saving; gathering
# over the gloo group keeps it on DP rank 0 only (and runs on CPU).
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                       "distrib_optim_fully_reshardable_mem_efficient": True}
_LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                "data_parallel_size", "context_parallel_size")
_LAYOUT_DEFAULTS = {"context_parallel_size": 1}     # for checkpoints saved before the key
_MAX_LISTED = 8


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and the file or tensor."""


class UnsupportedFormatError(CheckpointError):
    """A checkpoint in a format this code does not read: never taken for damage (not moved
    aside, no fallback to an older checkpoint)."""


def _rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast(value):
    """Rank 0's ``value`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(value) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


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


def checkpoint_format(path: str) -> Optional[int]:
    """The format of a complete checkpoint folder by the file that completes it: 3 (this format,
    ``checkpoint.json``; its ``format_version`` is checked by ``read_info``), 2 or 1 (older,
    not read), None when ``path`` is no complete checkpoint."""
    for name, version in ((INFO_FILE, FORMAT_VERSION), *_OLD_FORMAT_FILES):
        if os.path.isfile(os.path.join(path, name)):
            return version
    return None


def _unsupported(path: str, version) -> UnsupportedFormatError:
    return UnsupportedFormatError(
        f"checkpoint {path} is in format {version!r}, which this code no longer reads: it reads "
        f"format {FORMAT_VERSION} only (megatron-core dist_checkpointing with {INFO_FILE})")


def checkpoint_dirs(save: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``save`` as (step, path), oldest first."""
    if not save or not os.path.isdir(save):
        return []
    found = []
    for name in os.listdir(save):
        m = _ITER_RE.match(name)
        path = os.path.join(save, name)
        if m and checkpoint_format(path) is not None:
            found.append((int(m.group(1)), path))
    return sorted(found)


def resolve(path: str) -> str:
    """A checkpoint folder: ``path`` itself, or the newest complete one inside it."""
    if checkpoint_format(path) is not None:
        return path
    found = checkpoint_dirs(path)
    if not found:
        raise FileNotFoundError(f"{path}: no complete training checkpoint (iter_XXXXXXX with "
                                f"{INFO_FILE}) in or at this path")
    return found[-1][1]


def resolve_verified(path: str, log=lambda text: print(text, file=sys.stderr)) -> str:
    """What tools outside the trainer read (HF export, generation): ``path`` when it is an
    intact checkpoint, or the newest intact one in the save folder ``path``; damaged ones are
    named (``log``) and skipped there. A damaged checkpoint named directly, or a folder with
    no intact one, raises CheckpointError naming the damaged files, before anything is
    loaded. A checkpoint of another format raises UnsupportedFormatError."""
    def problems_of(folder: str) -> str:
        return "; ".join(verify(folder)[:_MAX_LISTED])

    newest = resolve(path)                  # FileNotFoundError when there is no checkpoint
    if newest == path:                      # a checkpoint named directly
        problems = problems_of(path)
        if problems:
            steps = checkpoint_dirs(os.path.dirname(os.path.abspath(path)))
            older = [p for _, p in steps if p < os.path.abspath(path)]
            hint = f"; an older one: {older[-1]}" if older else ""
            raise CheckpointError(f"checkpoint {path} is damaged: {problems}{hint}")
        return path
    damaged = []
    for _, candidate in reversed(checkpoint_dirs(path)):
        problems = problems_of(candidate)
        if not problems:
            return candidate
        damaged.append(f"{candidate}: {problems}")
        log(f"checkpoint {candidate} is damaged ({problems}): trying the previous one")
    raise CheckpointError(f"no intact checkpoint in {path}: " + " | ".join(damaged))


def read_info(path: str) -> dict:
    """What a checkpoint holds, without loading it: its ``checkpoint.json``. UnsupportedFormatError
    for a folder of another format, CheckpointError when the file is missing or unreadable."""
    version = checkpoint_format(path)
    if version is None:
        raise CheckpointError(f"{path}: not a complete checkpoint (no {INFO_FILE})")
    if version != FORMAT_VERSION:
        raise _unsupported(path, version)
    file = os.path.join(path, INFO_FILE)
    try:
        with open(file) as f:
            info = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file}: unreadable ({err})") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{file}: unreadable (not a JSON object)")
    if info.get("format_version") != FORMAT_VERSION:
        raise _unsupported(path, info.get("format_version"))
    return info


def _crc32(file: str) -> str:
    crc = 0
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _file_record(file: str, checksum: bool) -> dict:
    record = {"bytes": os.path.getsize(file)}
    if checksum:
        record["crc32"] = _crc32(file)
    return record


def _size_problems(path: str, files: dict) -> list[str]:
    problems = []
    for name, record in sorted(files.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            problems.append(f"{name} is missing")
        elif os.path.getsize(file) != record["bytes"]:
            problems.append(f"{name} has {os.path.getsize(file)} bytes, expected "
                            f"{record['bytes']} (truncated or overwritten)")
    return problems


def _checksum_problems(path: str, files: dict, names: list[str]) -> list[str]:
    problems = []
    for name in names:
        expected = files[name].get("crc32")
        if expected is not None and _crc32(os.path.join(path, name)) != expected:
            problems.append(f"{name}: CRC-32 differs from the one written at save time")
    return problems


def verify(path: str, checksums: bool = True) -> list[str]:
    """Problems of a checkpoint (missing, truncated or changed files), in this process; an empty
    list when it is intact. A checkpoint of another format raises UnsupportedFormatError."""
    try:
        info = read_info(path)
    except UnsupportedFormatError:
        raise
    except CheckpointError as err:
        return [str(err)]
    files = info.get("files", {})
    problems = _size_problems(path, files)
    if not problems and checksums:
        problems = _checksum_problems(path, files, sorted(files))
    return problems


def tensor_metadata(path: str) -> dict[str, tuple[tuple, torch.dtype]]:
    """(global shape, dtype) of every tensor of a format-3 checkpoint, from its metadata only."""
    from megatron.core import dist_checkpointing
    metadata = dist_checkpointing.load_tensors_metadata(path)
    return {key: (tuple(value.global_shape), value.dtype) for key, value in sorted(metadata.items())}


@contextlib.contextmanager
def _process_group():
    """A one-process gloo group when none exists (dist_checkpointing's load needs one)."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def load_model_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every model tensor of a format-3 checkpoint at full size, keyed as stored (components
    separate: ``...in_proj.weight.z``), whatever layout wrote it. Optimizer state is not read."""
    from megatron.core import dist_checkpointing
    metadata = dist_checkpointing.load_tensors_metadata(path)
    wanted = {key: value for key, value in metadata.items() if not key.startswith("optimizer.")}
    with _process_group():
        loaded = dist_checkpointing.load(wanted, path, validate_access_integrity=False)
    return {key: loaded[key] for key in sorted(wanted)}


def load_common_state(path: str) -> dict:
    """The common (non-tensor) part of a format-3 checkpoint: config, scheduler, step."""
    from megatron.core import dist_checkpointing
    return dist_checkpointing.load_common_state_dict(path)


def _write_json_atomic(file: str, value: dict) -> None:
    tmp = file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)


def _commit(tmp: str, final: str, info: dict, checksums: bool, keep_last: int) -> None:
    """Every rank: checksum a share of the written files; rank 0: write ``checkpoint.json``,
    rename ``tmp`` to ``final``, update ``latest`` and drop all but the last ``keep_last``."""
    rank, world = _rank_and_world()
    names = _broadcast(sorted(os.listdir(tmp)) if rank == 0 else None)
    records = {}
    for part in _all_gather({name: _file_record(os.path.join(tmp, name), checksums)
                             for name in names[rank::world]}):
        records.update(part)
    if rank == 0:
        _write_json_atomic(os.path.join(tmp, INFO_FILE),
                           {**info, "files": dict(sorted(records.items()))})
        old = final + ".old"
        if os.path.exists(final):                  # the same step saved again
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        save = os.path.dirname(final)
        with open(os.path.join(save, "latest.tmp"), "w") as f:
            f.write(f"{info['step']}\n")
        os.replace(os.path.join(save, "latest.tmp"), os.path.join(save, "latest"))
        if keep_last > 0:
            for _, path in checkpoint_dirs(save)[:-keep_last]:
                shutil.rmtree(path, ignore_errors=True)
    _barrier()


def _save_strategy():
    """megatron-core's torch_dist save strategy. Its writers report through a queue whose
    Manager ``megatron_adapter`` (patch ``sigterm_proof_write_queue``) starts so that it
    outlives a SIGTERM sent to the whole job (SLURM preemption), which must still save."""
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
    return TorchDistSaveShardedStrategy("torch_dist", 1)


def save_model_checkpoint(save: str, step: int, model, run_config: dict) -> str:
    """A model-only checkpoint (no optimizer, scheduler or RNG: training from it starts a fresh
    optimizer at step 0) of one whole model, e.g. weights imported from Hugging Face. It loads
    at any layout. Needs one process with megatron's parallel state (TP = PP = 1)."""
    from megatron.core import dist_checkpointing
    final = os.path.join(save, f"iter_{step:07d}")
    tmp = final + ".tmp"
    os.makedirs(save, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "config": run_config,
                             "train_state": {"step": step, "consumed_samples": 0}},
                            tmp, sharded_strategy=_save_strategy())
    info = {"format_version": FORMAT_VERSION, "step": step, "consumed_samples": 0,
            "tokens_seen": 0, "model_only": True, "saved_at": _now(),
            "layout": {"world_size": 1, "tensor_model_parallel_size": 1,
                       "pipeline_model_parallel_size": 1, "data_parallel_size": 1},
            "config": run_config}
    _commit(tmp, final, info, checksums=True, keep_last=0)
    return final


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Resumed:
    """What ``Checkpointer.load`` restored."""
    path: str
    step: int
    consumed_samples: int
    model_only: bool                # weights only: fresh optimizer, schedule and data order
    saved_layout: dict
    notes: list                     # e.g. RNG states not restored after a layout change


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    return isinstance(optimizer, DistributedOptimizer)


def _init_optimizer_state(optimizer) -> None:
    """Give a fresh Adam the state a saved one has (zeros), so that its sharded state dict
    describes the tensors to load; megatron-core expects it without apex / TE."""
    for o in _optimizers(optimizer):
        inner = getattr(o, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param] = {"step": torch.zeros((), dtype=torch.float32,
                                                              device=param.device),
                                          "exp_avg": torch.zeros_like(param),
                                          "exp_avg_sq": torch.zeros_like(param)}


def _optimizer_sharded_state(optimizer, model: dict, is_loading: bool) -> dict:
    """``optimizer.sharded_state_dict`` in the fully_reshardable form. megatron-core 0.16 cuts
    each parameter's state at the wrong offset after a chunk's first DDP bucket; the
    ``megatron_adapter`` patch ``fully_reshardable_bucket_padding`` corrects it (on save and
    on load)."""
    return optimizer.sharded_state_dict(model, is_loading=is_loading,
                                        metadata=_OPTIMIZER_METADATA)


def _load_optimizer(optimizer, state) -> None:
    optimizers = _optimizers(optimizer)
    states = [state] if len(optimizers) == 1 else [state[i] for i in range(len(optimizers))]
    for o, s in zip(optimizers, states):
        if _is_distributed(o):
            param_state = s.pop("param_state")
            kind = s.pop("param_state_sharding_type")
            if kind != "fully_reshardable":
                raise CheckpointError(f"optimizer state of type {kind!r}, expected "
                                      "'fully_reshardable'")
            # torch Adam's 'step' survives both calls, one tensor per parameter: the
            # megatron_adapter patches fully_reshardable_load_keeps_adam_step and
            # distributed_optimizer_own_step_tensors
            o.load_state_dict(s)
            o.load_parameter_state_from_fully_reshardable(param_state)
        else:
            o.load_state_dict(s)


def _differences(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now"
            for key in keys if saved.get(key) != current.get(key)]


class Checkpointer:
    """Saves and loads the training state of this rank (its model chunks, the optimizer, the
    LR scheduler, RNG states, step and consumed samples), and owns the saving policy: the
    interval (``due``), the last step saved or resumed (``last_saved``), keep-last and
    asynchronous saves. Every method is called by every rank of the job at the same point
    (they communicate)."""

    def __init__(self, save: str, process_groups, layout: dict, run_config: dict,
                 seq_length: int, keep_last: int = 2, async_save: bool = False,
                 checksums: bool = True, log: Callable[[str], None] = print,
                 save_interval: int = 0):
        self.save_dir, self.groups, self.layout = save, process_groups, dict(layout)
        self.run_config, self.seq_length = run_config, seq_length
        self.keep_last, self.async_save, self.checksums = keep_last, async_save, checksums
        self.save_interval = save_interval
        self.last_saved: Optional[int] = None      # step of the newest save issued or resumed
        self.log = log
        self.rank = _rank_and_world()[0]
        self._strategy = None
        self._queue = None
        self._pending: list[str] = []              # asynchronous saves being written
        self._finished: list[str] = []             # completed, not yet reported
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
            self._queue = AsyncCallsQueue()

    def due(self, step: int) -> bool:
        """Whether ``step`` is a save step (every ``checkpoint.save_interval`` steps)."""
        return bool(self.save_interval) and step % self.save_interval == 0

    def _coordinates(self) -> tuple[tuple, tuple]:
        """This rank's place in the PP x TP x DP (x CP, when CP > 1) grid of RNG states."""
        g = self.groups
        shape, offset = (g.pp.size(), g.tp.size(), g.dp.size()), (g.pp.rank(), g.tp.rank(), g.dp.rank())
        if g.cp.size() > 1:
            shape, offset = shape + (g.cp.size(),), offset + (g.cp.rank(),)
        return shape, offset

    def _rng_object(self, data):
        from megatron.core.dist_checkpointing.mapping import ShardedObject
        shape, offset = self._coordinates()
        return ShardedObject("rng_state", data, shape, offset, replica_id=0)

    @staticmethod
    def _model_state(chunks: list) -> dict:
        if len(chunks) == 1:
            return {"model": chunks[0].sharded_state_dict()}
        return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}

    def save(self, step: int, consumed_samples: int, chunks: list, optimizer, scheduler) -> str:
        """Write a checkpoint of ``step``; returns the folder it has once complete. With
        ``async_save`` the tensors are written by background processes and the checkpoint
        completes at a later ``poll`` (or ``wait``); an earlier pending save is finished first."""
        from megatron.core import dist_checkpointing
        self._finalize(blocking=True)
        self.last_saved = step
        final = os.path.join(self.save_dir, f"iter_{step:07d}")
        tmp = final + ".tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        model = self._model_state(chunks)
        state = {**model,
                 "optimizer": _optimizer_sharded_state(optimizer, model, is_loading=False),
                 "rng_state": self._rng_object(rng_state()),
                 "scheduler": scheduler.state_dict(),
                 "train_state": {"step": step, "consumed_samples": consumed_samples},
                 "config": self.run_config}
        if self._strategy is None:
            self._strategy = _save_strategy()
        info = {"format_version": FORMAT_VERSION, "step": step,
                "consumed_samples": consumed_samples,
                "tokens_seen": consumed_samples * self.seq_length, "model_only": False,
                "saved_at": _now(), "layout": self.layout, "config": self.run_config}
        request = dist_checkpointing.save(
            state, tmp, sharded_strategy=self._strategy, async_sharded_save=self.async_save,
            # DP ranks other than 0 hold no gathered optimizer state: not a difference
            preprocess_common_before_consistancy_check=_without_optimizer)
        commit = partial(_commit, tmp, final, info, self.checksums, self.keep_last)
        if request is None:
            commit()
        else:
            request.add_finalize_fn(commit)
            self._queue.schedule_async_request(request)
            self._pending.append(final)
        return final

    def poll(self) -> list[str]:
        """Complete the asynchronous saves whose writers are done on every rank; returns the
        folders completed since the last ``poll`` or ``wait``. Collective (all ranks call it at
        the same step)."""
        self._finalize(blocking=False)
        finished, self._finished = self._finished, []
        return finished

    def wait(self) -> list[str]:
        """Complete every pending asynchronous save (blocks); returns as ``poll``."""
        self._finalize(blocking=True)
        finished, self._finished = self._finished, []
        return finished

    def _finalize(self, blocking: bool) -> None:
        if self._queue is None or not self._pending:
            return
        done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        self._finished += self._pending[:len(done)]
        self._pending = self._pending[len(done):]

    def remove_incomplete(self) -> None:
        """Rank 0 deletes ``iter_*.tmp`` folders: saves that never completed."""
        if self.rank == 0 and os.path.isdir(self.save_dir):
            for name in sorted(os.listdir(self.save_dir)):
                if name.startswith("iter_") and name.endswith(".tmp"):
                    self.log(f"removing the incomplete checkpoint {name} (a save that never "
                             "finished)")
                    shutil.rmtree(os.path.join(self.save_dir, name), ignore_errors=True)
        _barrier()

    def _problems(self, path: str) -> list[str]:
        """Distributed verification: rank 0 reads checkpoint.json and the file sizes, then every
        rank checksums a share of the files."""
        rank, world = _rank_and_world()
        files, problems, unsupported = None, [], None
        if rank == 0:
            try:
                files = read_info(path).get("files", {})
                problems = _size_problems(path, files)
            except UnsupportedFormatError as err:
                unsupported = str(err)
            except CheckpointError as err:
                problems = [str(err)]
        files, problems, unsupported = _broadcast((files, problems, unsupported))
        if unsupported:                                  # every rank raises the same
            raise UnsupportedFormatError(unsupported)
        if problems or not self.checksums:
            return problems
        names = sorted(files)[rank::world]
        return [p for part in _all_gather(_checksum_problems(path, files, names)) for p in part]

    def load(self, chunks: list, optimizer, scheduler) -> Optional[Resumed]:
        """Restore the newest usable checkpoint in the save folder; None when there is none. A
        damaged one is reported, moved to ``iter_<step>.corrupt`` (``.corrupt.1``, ``.2``, ...
        when that name is taken: a step damaged again after a resume) and the previous one
        used. A checkpoint of another format raises UnsupportedFormatError."""
        found = _broadcast(checkpoint_dirs(self.save_dir) if self.rank == 0 else None)
        rejected = []
        for _, path in reversed(found):
            problems = self._problems(path)
            if not problems:
                resumed = self._load(path, chunks, optimizer, scheduler)
                self.last_saved = resumed.step
                return resumed
            listed = "; ".join(problems[:_MAX_LISTED])
            rejected.append(f"{path}: {listed}")
            if self.rank == 0:
                moved = _unused_name(path + ".corrupt")
                self.log(f"checkpoint {path} is damaged ({listed}): moved to "
                         f"{os.path.basename(moved)}, trying the previous one")
                os.replace(path, moved)
            _barrier()
        if rejected:
            raise CheckpointError(f"no usable checkpoint in {self.save_dir}: "
                                  + " | ".join(rejected))
        return None

    def _check_request(self, path: str, state: dict, saved: dict) -> None:
        """Every rank compares the tensors it is about to request with the checkpoint's metadata,
        then all raise together (a lone failing rank would leave the others in a collective)."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
        stored = dist_checkpointing.load_tensors_metadata(path)
        requested, _, _ = load_preprocess(state)
        problems = []
        for value in nested_values(requested):
            if not isinstance(value, ShardedTensor):
                continue
            if value.key not in stored:
                problems.append(f"tensor {value.key!r} is not in the checkpoint")
            elif tuple(stored[value.key].global_shape) != tuple(value.global_shape):
                problems.append(f"tensor {value.key!r} has shape "
                                f"{tuple(stored[value.key].global_shape)} in the checkpoint, "
                                f"the model expects {tuple(value.global_shape)}")
        problems = sorted({p for part in _all_gather(problems) for p in part})
        if problems:
            model_diff = _differences((saved.get("config") or {}).get("model", {}),
                                      (self.run_config or {}).get("model", {}))
            hint = (f" (the run config's model section differs: {'; '.join(model_diff)})"
                    if model_diff else "")
            raise CheckpointError(f"checkpoint {path} does not fit this model{hint}: "
                                  + "; ".join(problems[:_MAX_LISTED])
                                  + (f" and {len(problems) - _MAX_LISTED} more"
                                     if len(problems) > _MAX_LISTED else ""))

    def _load(self, path: str, chunks: list, optimizer, scheduler) -> Resumed:
        from megatron.core import dist_checkpointing
        info = _broadcast(read_info(path) if self.rank == 0 else None)
        saved = info.get("layout", {})
        model_only = bool(info.get("model_only"))
        notes = []
        if not model_only and saved.get("use_distributed_optimizer") is not None and \
                saved["use_distributed_optimizer"] != self.layout.get("use_distributed_optimizer"):
            raise CheckpointError(
                f"checkpoint {path} was saved with parallel.use_distributed_optimizer="
                f"{saved['use_distributed_optimizer']}: resume with the same setting")
        saved = {**_LAYOUT_DEFAULTS, **saved}
        same_layout = all(saved.get(k) == self.layout.get(k) for k in _LAYOUT_KEYS)
        model = self._model_state(chunks)
        state = dict(model)
        if not model_only:
            _init_optimizer_state(optimizer)
            state["optimizer"] = _optimizer_sharded_state(optimizer, model, is_loading=True)
            if same_layout:
                state["rng_state"] = self._rng_object(None)
            else:
                notes.append("RNG states not restored: the layout changed ("
                             + ", ".join(f"{k} {saved.get(k)} -> {self.layout.get(k)}"
                                         for k in _LAYOUT_KEYS
                                         if saved.get(k) != self.layout.get(k)) + ")")
        self._check_request(path, state, info)
        loaded = dist_checkpointing.load(state, path)
        for key, chunk in zip(model, chunks):
            chunk.load_state_dict(loaded[key])
        if model_only:
            optimizer.reload_model_params()        # the optimizer's fp32 main copies
            return Resumed(path, 0, 0, True, saved, notes)
        _load_optimizer(optimizer, loaded["optimizer"])
        scheduler.load_state_dict(loaded["scheduler"])
        if "rng_state" in loaded:
            set_rng_state(loaded["rng_state"])
        train = loaded["train_state"]
        return Resumed(path, int(train["step"]), int(train["consumed_samples"]), False, saved,
                       notes)


def _without_optimizer(common: dict) -> dict:
    return {key: value for key, value in common.items() if key != "optimizer"}


def _unused_name(path: str) -> str:
    """``path``, or ``path.1``, ``path.2``, ... : the first that does not exist."""
    candidate, n = path, 0
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate
