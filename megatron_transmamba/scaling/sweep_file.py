"""The sweep file: model families, one size knob, budgets, seeds, a base run config, launch.

A sweep file is YAML with these sections (docs/scaling.md has the full reference)::

    name: tiny_cpu
    families:                      # one model family = layer pattern + TransPoint schedule
      - {name: transmamba, pattern_unit: "T-", transpoint_schedule: cyclic,
         transpoint_values: [0, 16, 32, 64]}
      - {name: transformer, pattern_unit: "*-", seeds: [1, 2]}   # its own seeds
    size: {knob: width, values: [32, 48, 64], depth: 2, head_dim: 16, ffn_ratio: 2.0}
    budget: {tokens: [8192, 16384]}            # or flops: [...] or tokens_per_parameter: [...]
    seeds: [1]
    base: {model: {seq_length: 64}, training: {micro_batch_size: 4, lr: 3.0e-3}}
    launch: {mode: inprocess}

Every key is checked: an unknown one is an error that names it and suggests the nearest valid
key, like the run config's. The base run config is validated when the grid is expanded
(``megatron_transmamba.scaling.plan``).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

KNOBS = ("depth", "width")
LAUNCH_MODES = ("inprocess", "subprocess", "torchrun", "slurm", "multinode")
BUDGET_KINDS = ("tokens", "flops", "tokens_per_parameter")


@dataclass
class FamilySpec:
    name: str = ""
    """Used in run names and plots: letters, digits, ``_`` and ``.``."""
    pattern_unit: Optional[str] = None
    """Repeated (and cut) until the model has ``depth`` mixer layers (``T``, ``M``, ``*``), each
    with the ``-`` that follows it: ``T-`` at depth 3 is ``T-T-T-``; ``M-M-*-`` at depth 4 is
    ``M-M-*-M-``."""
    layer_pattern: Optional[str] = None
    """A fixed pattern instead of ``pattern_unit`` (only with the ``width`` knob)."""
    transpoint_schedule: Optional[str] = None
    """Any ``model.transpoint_schedule`` (default: ``v9`` when the pattern has ``T`` layers)."""
    transpoint_values: Optional[list] = None
    overrides: dict = field(default_factory=dict)
    """Run-config sections merged over ``base`` for this family (e.g. its own learning rate)."""
    seeds: Optional[list] = None
    """This family's seeds (default: the sweep's ``seeds``), e.g. more seeds for the models a
    comparison hinges on."""


@dataclass
class SizeSpec:
    knob: str = "depth"
    """``depth``: the value is the number of mixer layers and hidden = depth x aspect_ratio
    (nanochat's knob). ``width``: the value is the hidden size, at a fixed ``depth``."""
    values: list = field(default_factory=list)
    aspect_ratio: int = 64
    """depth knob: hidden = round_up(depth x aspect_ratio, head_dim)."""
    depth: Optional[int] = None
    """width knob: mixer layers of every model."""
    head_dim: int = 64
    """P (mixer head dim) and the ``*`` layers' head dim; heads = hidden / head_dim."""
    state_dim: Optional[int] = None
    """N, the mixer's state and Q/K head dim (default: head_dim, DESIGN section 3)."""
    group_size: int = 1
    """Mixer value heads per Q/K group: G = H / group_size (1: G = H, as in the paper's models)."""
    ffn_ratio: float = 8.0 / 3.0
    """ffn_hidden_size = round_up(ffn_ratio x hidden, multiple_of) (SwiGLU)."""
    multiple_of: int = 64
    per_size: dict = field(default_factory=dict)
    """Run-config sections for one knob value, e.g. ``{24: {training: {lr: 1.0e-4}}}``."""


@dataclass
class BudgetSpec:
    tokens: Optional[list] = None
    """Training tokens D of every run (a grid: each size trains at each budget)."""
    flops: Optional[list] = None
    """Training FLOPs C (IsoFLOP profiles): D = C / (training FLOPs per token of the model)."""
    tokens_per_parameter: Optional[list] = None
    """D = ratio x N (parameters), e.g. Chinchilla's 20."""

    @property
    def kind(self) -> str:
        return next(k for k in BUDGET_KINDS if getattr(self, k) is not None)

    @property
    def values(self) -> list:
        return getattr(self, self.kind)


@dataclass
class ScheduleSpec:
    warmup_fraction: Optional[float] = 0.1
    """lr_warmup_iters = round(fraction x train_iters) (None: keep the base config's)."""
    min_train_iters: int = 10
    """A budget that gives fewer optimizer steps than this is an error (raise the budget or
    lower the batch)."""
    keep_checkpoints: bool = True
    """False: delete a run's checkpoints once its results are written."""
    data_cache: str = "shared"
    """``shared``: every run uses the base ``data.cache_dir``. ``per_run``: each run caches the
    embedded corpus and megatron's sample/shuffle indices in its own folder, so runs trained at
    the same time (a SLURM array) never write the same index files at once."""


@dataclass
class SlurmSpec:
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "24:00:00"
    gpus_per_node: Optional[int] = None
    """Default: launch.nproc_per_node; 0 leaves ``--gpus-per-node`` out (CPU partitions)."""
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    max_parallel: Optional[int] = None
    """Array throttle (``--array=0-N%max_parallel``)."""
    sbatch: list = field(default_factory=list)
    """Extra ``#SBATCH`` arguments, e.g. ``["--exclusive", "--constraint=h100"]``."""
    setup: list = field(default_factory=list)
    """Shell lines run before training, e.g. ``["source .venv/bin/activate"]``."""


@dataclass
class LaunchSpec:
    mode: str = "inprocess"
    """``inprocess`` (sequential, this process), ``subprocess`` (sequential, one process per run),
    ``torchrun`` (sequential, local torchrun), ``slurm`` (job-array script), ``multinode``
    (a torchrun script to start on every node)."""
    nproc_per_node: int = 1
    nnodes: int = 1
    master_port: int = 29500
    slurm: SlurmSpec = field(default_factory=SlurmSpec)

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


@dataclass
class SweepSpec:
    name: str = ""
    families: list = field(default_factory=list)
    size: SizeSpec = field(default_factory=SizeSpec)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    seeds: list = field(default_factory=lambda: [1234])
    base: dict = field(default_factory=dict)
    """A run config (sections model/data/training/checkpoint/logging/parallel) every run starts
    from; the sweep sets the model shape, train_iters, seed, warmup and checkpoint paths."""
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    launch: LaunchSpec = field(default_factory=LaunchSpec)
    output_dir: Optional[str] = None
    """Where the run folders and results go (default ``runs/sweeps/<name>``)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _number(where: str, value: Any) -> float:
    if isinstance(value, str):  # YAML 1.1 reads 1e12 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{where}: {value!r} is not a positive number")
    return value


def _build(cls, raw: Any, where: str):
    """Dataclass ``cls`` from a mapping, with unknown keys named and nested specs built."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where or 'sweep file'}: expected a mapping, got {raw!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown key {where + '.' if where else ''}{key}{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            value = _build(kind, value, f"{where}.{key}" if where else key)
        values[key] = value
    return cls(**values)


def build_sweep(raw: dict) -> SweepSpec:
    """SweepSpec from a parsed sweep file, every key and rule checked."""
    spec = _build(SweepSpec, raw, "")
    if not isinstance(spec.families, list) or not spec.families:
        raise ValueError("families: needs a list of at least one model family")
    spec.families = [_build(FamilySpec, f, f"families[{i}]") for i, f in enumerate(spec.families)]
    _validate(spec)
    return spec


def load_sweep(path: str) -> SweepSpec:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ValueError(f"sweep file {path!r} does not exist") from None
    except yaml.YAMLError as err:
        raise ValueError(f"sweep file {path!r} is not valid YAML: {err}") from None
    return build_sweep(raw)


def _validate(spec: SweepSpec) -> None:
    if not spec.name or not _is_name(spec.name):
        raise ValueError(f"name={spec.name!r}: needs letters, digits, '_', '-' or '.'")
    names = [f.name for f in spec.families]
    for i, fam in enumerate(spec.families):
        where = f"families[{i}]"
        if not fam.name or not _is_name(fam.name) or "-" in fam.name:
            raise ValueError(f"{where}.name={fam.name!r}: needs letters, digits, '_' or '.'")
        if (fam.pattern_unit is None) == (fam.layer_pattern is None):
            raise ValueError(f"{where} ({fam.name}): give exactly one of pattern_unit and layer_pattern")
        if fam.layer_pattern is not None and spec.size.knob == "depth":
            raise ValueError(f"{where} ({fam.name}): a fixed layer_pattern cannot follow the depth "
                             "knob; use pattern_unit")
        pattern = fam.pattern_unit or fam.layer_pattern
        if not pattern or set(pattern) - set("TM*-") or set(pattern) <= {"-"}:
            raise ValueError(f"{where} ({fam.name}): pattern {pattern!r} needs T, M, * or - "
                             "symbols and at least one mixer")
        if not isinstance(fam.overrides, dict):
            raise ValueError(f"{where}.overrides: expected run-config sections, got {fam.overrides!r}")
        if fam.seeds is not None:
            _check_seeds(f"{where}.seeds", fam.seeds)
    if len(set(names)) != len(names):
        raise ValueError(f"families: names must be unique, got {names}")

    s = spec.size
    if s.knob not in KNOBS:
        raise ValueError(f"size.knob={s.knob!r}: expected one of {KNOBS}")
    if not s.values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in s.values):
        raise ValueError(f"size.values={s.values!r}: needs a list of positive integers")
    if len(set(s.values)) != len(s.values):
        raise ValueError(f"size.values={s.values!r}: values must be unique")
    if s.knob == "width" and (not isinstance(s.depth, int) or s.depth < 1):
        raise ValueError("size.depth: the width knob needs a fixed depth (mixer layers per model)")
    for name in ("aspect_ratio", "head_dim", "group_size", "multiple_of"):
        if not isinstance(getattr(s, name), int) or getattr(s, name) < 1:
            raise ValueError(f"size.{name}={getattr(s, name)!r}: must be a positive integer")
    _number("size.ffn_ratio", s.ffn_ratio)
    if s.knob == "width":
        bad = [v for v in s.values if v % s.head_dim]
        if bad:
            raise ValueError(f"size.values {bad}: widths must be multiples of size.head_dim={s.head_dim}")
    unknown_sizes = [k for k in s.per_size if k not in s.values]
    if unknown_sizes:
        raise ValueError(f"size.per_size keys {unknown_sizes} are not in size.values {s.values}")

    given = [k for k in BUDGET_KINDS if getattr(spec.budget, k) is not None]
    if len(given) != 1:
        raise ValueError(f"budget: give exactly one of {', '.join(BUDGET_KINDS)} (got {given or 'none'})")
    kind = given[0]
    values = getattr(spec.budget, kind)
    if not isinstance(values, list) or not values:
        raise ValueError(f"budget.{kind}: needs a list of positive numbers")
    setattr(spec.budget, kind, [_number(f"budget.{kind}", v) for v in values])

    _check_seeds("seeds", spec.seeds)
    if not isinstance(spec.base, dict):
        raise ValueError(f"base: expected a run config (a mapping of sections), got {spec.base!r}")
    w = spec.schedule.warmup_fraction
    if w is not None and not 0 <= w < 1:
        raise ValueError(f"schedule.warmup_fraction={w!r}: must be in [0, 1)")
    if spec.schedule.data_cache not in ("shared", "per_run"):
        raise ValueError(f"schedule.data_cache={spec.schedule.data_cache!r}: expected 'shared' or 'per_run'")
    if spec.schedule.min_train_iters < 1:
        raise ValueError("schedule.min_train_iters: must be >= 1")

    la = spec.launch
    if la.mode not in LAUNCH_MODES:
        raise ValueError(f"launch.mode={la.mode!r}: expected one of {LAUNCH_MODES}")
    if la.nproc_per_node < 1 or la.nnodes < 1:
        raise ValueError("launch.nproc_per_node and launch.nnodes must be >= 1")


def _check_seeds(where: str, seeds) -> None:
    if not isinstance(seeds, list) or not seeds or any(
            isinstance(v, bool) or not isinstance(v, int) for v in seeds):
        raise ValueError(f"{where}={seeds!r}: needs a list of integers")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{where}={seeds!r}: seeds must be unique")


def _is_name(text: str) -> bool:
    return isinstance(text, str) and all(c.isalnum() or c in "_-." for c in text)
