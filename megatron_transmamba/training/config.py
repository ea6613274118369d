"""Run configuration: YAML sections, ``--section.key=value`` overrides, clear errors.

A run config has the sections ``model`` (TransMambaConfig fields), ``data`` (DataConfig),
``training``, ``checkpoint``, ``logging`` and ``parallel``. Unknown sections or keys are errors
that name the key and suggest the closest known one; values are type-checked against the field's
default. The resolved config is written next to checkpoints so a run can be reproduced.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from megatron_transmamba.config import yaml_fields
from megatron_transmamba.data.config import DataConfig

RECOMPUTE_CHOICES = ("none", "selective", "full")
RECOMPUTE_MODULES = ("core_attn", "mlp")
_MODEL_FIELDS_SET_ELSEWHERE = {"params_dtype", "bf16", "fp16", "num_layers",
                               "tensor_model_parallel_size", "pipeline_model_parallel_size",
                               "sequence_parallel", "context_parallel_size"}


@dataclass
class TrainingConfig:
    micro_batch_size: int = 4
    """Sequences per micro-batch on each data-parallel rank."""
    global_batch_size: Optional[int] = None
    """Sequences per optimizer step over all ranks (None: micro_batch_size x data-parallel size).
    Must be a multiple of micro_batch_size x data-parallel size (gradient accumulation)."""
    train_iters: int = 200
    """Optimizer steps."""
    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_warmup_iters: int = 20
    lr_decay_style: str = "cosine"
    """``cosine``, ``linear`` or ``constant`` decay after warmup (megatron-core scheduler)."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clipping (0 disables)."""
    seed: int = 1234
    precision: str = "auto"
    """``auto`` (bf16 on GPU, fp32 on CPU), ``bf16`` or ``fp32``."""
    eval_interval: int = 50
    """Steps between validation-loss evaluations (0 disables)."""
    eval_iters: int = 10
    """Validation micro-batches per evaluation."""
    log_interval: int = 10
    exit_at_step: Optional[int] = None
    """Stop after this step (saving a checkpoint when checkpoint.save is set), e.g. to fit a job
    into a time slot; resuming continues the same schedule up to train_iters."""
    nan_action: str = "stop"
    """What a NaN/inf loss or gradient norm does (the step's update is never applied): ``stop``
    saves a checkpoint of the last good state (when checkpoint.save is set) and ends the run
    with an error; ``skip`` skips the update and goes on with the next batch."""
    nan_skip_limit: int = 10
    """With nan_action='skip': after this many consecutive skipped steps, stop as with 'stop'
    (0: never)."""
    make_vocab_size_divisible_by: int = 64
    """The vocabulary is padded to a multiple of lcm(this, TP size): the same padded model at
    every TP size that divides it."""
    recompute: str = "none"
    """Activation recomputation: ``none``; ``selective`` (the modules of ``recompute_modules``
    keep their inputs and run again in backward); ``full`` (each layer keeps only its input and
    runs its forward again in backward; needs zero dropout)."""
    recompute_modules: tuple = ("core_attn",)
    """For ``recompute: selective``, megatron-core's module names: ``core_attn`` (the
    TransMamba mixer between in_proj and out_proj: conv, attention / Memory Converter / SSM,
    gated norm; and the softmax attention of ``*`` layers) and ``mlp`` (the MLP of ``-``
    layers)."""
    compile: bool = False
    """Regional ``torch.compile``: each layer of each model chunk compiled on its own before
    DDP wraps it (training/graphs.py); not with ``data.reset_at_eod``."""
    compile_fullgraph: bool = True
    """With ``compile``: a graph break is an error (false: the layer runs partly eager)."""
    cuda_graphs: bool = False
    """CUDA graphs of each layer's forward and backward (``torch.cuda.make_graphed_callables``,
    static shapes). Needs CUDA, no packed documents, no dropout, no recomputation and no
    pipeline parallelism (training/graphs.py)."""


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    """Directory for checkpoints (None: no checkpoints)."""
    save_interval: int = 100
    """Steps between checkpoints (the last step is always saved when ``save`` is set)."""
    resume: bool = False
    """Continue from the newest complete checkpoint in ``save``."""
    keep_last: int = 2
    """How many complete checkpoints to keep (0 keeps all)."""
    async_save: bool = False
    """Write the checkpoint files in background processes (megatron-core's asynchronous
    dist_checkpointing save) while training goes on; the checkpoint completes (checksums,
    rename) at a later step, and before the run ends."""
    verify_checksums: bool = True
    """Record a CRC-32 of every file at save and check it on resume (all ranks share the reading);
    sizes are always checked. A damaged checkpoint is moved aside and the previous one used."""


@dataclass
class LoggingConfig:
    tensorboard_dir: Optional[str] = None
    """Where TensorBoard scalars go (None: ``<checkpoint.save>/tensorboard`` if saving, else off)."""
    progress_bar: bool = True
    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s of one GPU for MFU (None: by device name, e.g. 989 for H100/H200 in
    bf16 and 494.5 in fp32/tf32, see training/metrics.py; on CPU no MFU is printed)."""
    profile: bool = False
    """Profile steps profile_step_start..profile_step_end with the PyTorch profiler: a Chrome
    trace per profiled rank, a table of the costliest operators and the device's busy time
    (training/profiling.py)."""
    profile_step_start: int = 3
    profile_step_end: int = 4
    profile_ranks: tuple = (0,)
    profile_dir: Optional[str] = None
    """Where the traces go (None: ``<checkpoint.save>/profile``, or ``runs/profile``)."""


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """Ranks that split every layer (heads, groups, FFN, vocabulary); launch a multiple of
    tensor x pipeline parallel size processes (the rest is data parallelism)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages (megatron-core's 1F1B schedule); the layer pattern splits evenly or at
    its '|' marks, layers keep their global index (TransPoints do not move)."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline rank (interleaved 1F1B): PP x this many stages in all."""
    use_distributed_optimizer: bool = True
    """megatron-core's distributed optimizer: each data-parallel rank keeps its 1/DP share of
    the fp32 main weights and Adam moments; gradients are reduce-scattered and the updated
    weights all-gathered (the same arithmetic as the all-reduce and a replicated Adam)."""
    overlap_grad_reduce: bool = True
    """Start each gradient bucket's data-parallel reduction during the backward of the last
    micro-batch (megatron-core DDP); earlier micro-batches accumulate without communication."""
    sequence_parallel: bool = False
    """Shard norms and residuals along the sequence over the tensor-parallel ranks (needs
    tensor_model_parallel_size > 1 and seq_length divisible by it)."""
    context_parallel_size: int = 1
    """Ranks that split every sequence into contiguous shards (context parallelism, CP:
    docs/parallelism.md): SSM state passing, the conv's halo and the attention prefix cross
    the shards; needs seq_length divisible by it. World size = TP x PP x CP x DP."""


@dataclass
class RunConfig:
    model: dict = field(default_factory=dict)
    """Keyword arguments of TransMambaConfig (validated when the model config is built)."""
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "training": TrainingConfig, "checkpoint": CheckpointConfig,
             "logging": LoggingConfig, "parallel": ParallelConfig}


def _unknown(kind: str, key: str, known) -> ValueError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown {kind} {key!r}{hint}")


def _coerce(where: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the type of the field's default; YAML lists become tuples."""
    if default is None or value is None:
        return value
    expected = type(default)
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected in (tuple, list):
        ok = isinstance(value, (list, tuple))
        value = expected(_inf(v) for v in value) if ok else value
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ValueError(f"{where}={value!r}: expected {expected.__name__} (default {default!r})")
    return value


def _inf(v):
    return math.inf if isinstance(v, str) and v.lower() in ("inf", ".inf", "infinity") else v


def _model_defaults() -> dict:
    out = {}
    for name, f in yaml_fields().items():
        if name in _MODEL_FIELDS_SET_ELSEWHERE:
            continue
        out[name] = f.default if f.default is not dataclasses.MISSING else None
    return out


def build_run_config(raw: dict) -> RunConfig:
    """RunConfig from a nested dict (a parsed YAML file), with every key checked."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"run config must be a mapping of sections, got {type(raw).__name__}")
    cfg = RunConfig()
    for section, values in raw.items():
        if section != "model" and section not in _SECTIONS:
            raise _unknown("config section", section, ["model", *_SECTIONS])
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ValueError(f"config section {section!r} must be a mapping, got {values!r}")
        if section == "model":
            defaults = _model_defaults()
            for key, value in values.items():
                if key not in defaults:
                    raise _unknown("model key", f"{key}", defaults)
                cfg.model[key] = _coerce(f"model.{key}", value, defaults[key])
            continue
        target = getattr(cfg, section)
        known = {f.name: f for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in known:
                raise _unknown(f"{section} key", key, known)
            default = getattr(target, key)
            if section == "data" and key in ("data_path", "valid_data_path") \
                    and isinstance(value, str):
                value = [value]
            setattr(target, key, _coerce(f"{section}.{key}", value, default))
    cfg.data.validate()
    _validate(cfg)
    return cfg


def _validate(cfg: RunConfig) -> None:
    t = cfg.training
    g = cfg.logging
    if g.profile and not 1 <= g.profile_step_start <= g.profile_step_end <= t.train_iters:
        raise ValueError(f"logging.profile_step_start={g.profile_step_start} and "
                         f"logging.profile_step_end={g.profile_step_end} must satisfy 1 <= start "
                         f"<= end <= training.train_iters={t.train_iters}")
    if g.profile and not all(isinstance(r, int) and r >= 0 for r in g.profile_ranks):
        raise ValueError(f"logging.profile_ranks={list(g.profile_ranks)}: expected a list of "
                         "ranks (non-negative integers)")
    for name in ("micro_batch_size", "train_iters", "eval_iters", "log_interval"):
        if getattr(t, name) < 1:
            raise ValueError(f"training.{name}={getattr(t, name)}: must be >= 1")
    for name in ("lr_warmup_iters", "eval_interval"):
        if getattr(t, name) < 0:
            raise ValueError(f"training.{name}={getattr(t, name)}: must be >= 0")
    if t.lr_warmup_iters >= t.train_iters:
        raise ValueError(f"training.lr_warmup_iters={t.lr_warmup_iters} must be smaller than "
                         f"training.train_iters={t.train_iters}")
    if t.global_batch_size is not None and (t.global_batch_size < 1
                                            or t.global_batch_size % t.micro_batch_size):
        raise ValueError(f"training.global_batch_size={t.global_batch_size}: must be a positive "
                         f"multiple of training.micro_batch_size={t.micro_batch_size}")
    if t.recompute not in RECOMPUTE_CHOICES:
        raise ValueError(f"training.recompute={t.recompute!r}: expected one of "
                         f"{', '.join(RECOMPUTE_CHOICES)}")
    bad = [m for m in t.recompute_modules if m not in RECOMPUTE_MODULES]
    if bad or not t.recompute_modules:
        raise ValueError(f"training.recompute_modules={t.recompute_modules!r}: expected a "
                         f"non-empty list of {', '.join(RECOMPUTE_MODULES)}")
    if t.nan_action not in ("skip", "stop"):
        raise ValueError(f"training.nan_action={t.nan_action!r}: expected 'skip' or 'stop'")
    if t.nan_skip_limit < 0:
        raise ValueError(f"training.nan_skip_limit={t.nan_skip_limit}: must be >= 0")
    if t.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"training.precision={t.precision!r}: expected 'auto', 'bf16' or 'fp32'")
    if t.lr_decay_style not in ("cosine", "linear", "constant"):
        raise ValueError(f"training.lr_decay_style={t.lr_decay_style!r}: expected cosine, linear or constant")
    if not 0 <= t.min_lr <= t.lr:
        raise ValueError(f"training.min_lr={t.min_lr}: must be in [0, training.lr={t.lr}]")
    c = cfg.checkpoint
    if c.save_interval < 1:
        raise ValueError(f"checkpoint.save_interval={c.save_interval}: must be >= 1")
    if c.keep_last < 0:
        raise ValueError(f"checkpoint.keep_last={c.keep_last}: must be >= 0 (0 keeps all)")
    if c.async_save and not c.save:
        raise ValueError("checkpoint.async_save=true needs checkpoint.save")
    if c.resume and not c.save:
        raise ValueError("checkpoint.resume=true needs checkpoint.save (the directory to resume from)")
    p = cfg.parallel
    if p.tensor_model_parallel_size < 1 or p.pipeline_model_parallel_size < 1:
        raise ValueError("parallel.tensor_model_parallel_size and pipeline_model_parallel_size must be >= 1")
    if p.sequence_parallel and p.tensor_model_parallel_size == 1:
        raise ValueError("parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1")
    v = p.virtual_pipeline_model_parallel_size
    if v is not None and (v < 2 or p.pipeline_model_parallel_size < 2):
        raise ValueError(f"parallel.virtual_pipeline_model_parallel_size={v}: must be >= 2 and "
                         "needs parallel.pipeline_model_parallel_size >= 2 (or leave it unset)")


def parse_overrides(args: list[str]) -> dict:
    """``--section.key=value`` (or ``--section.key value``) into a nested dict; values are YAML,
    or the text as given where it is not YAML (``--model.layer_pattern=*-*-``)."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ValueError(f"override {arg!r}: expected --section.key=value (e.g. --training.lr=3e-4)")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ValueError(f"override {arg!r} has no value")
            key, text = arg[2:], args[i + 1]
            i += 1
        section, name = key.split(".", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            # not YAML: the text itself, e.g. a layer pattern starting with '*' (a YAML alias);
            # a field of another type then names itself in build_run_config's type check
            value = text
        out.setdefault(section, {})[name] = value
        i += 1
    return out


def merge(base: dict, overrides: dict) -> dict:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in (base or {}).items()}
    for section, values in overrides.items():
        current = merged.get(section) or {}
        if not isinstance(current, dict):
            raise ValueError(f"config section {section!r} must be a mapping")
        merged[section] = {**current, **values}
    return merged


def load_run_config(path: Optional[str], overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (or none: defaults) and apply command-line overrides."""
    raw: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ValueError(f"config file {path!r} does not exist") from None
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path!r} is not valid YAML: {err}") from None
    return build_run_config(merge(raw, parse_overrides(list(overrides))))
