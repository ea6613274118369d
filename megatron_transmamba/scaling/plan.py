"""Expand a sweep file into runs: one folder per (family, size, budget, seed) with its resolved
run config.

Shapes follow one knob (nanochat style): heads = hidden / head_dim, H = heads, P = head_dim,
N = state_dim, G = H / group_size, ``*`` layers with the same heads and head dim, and
ffn = round_up(ffn_ratio x hidden, multiple_of). A budget becomes ``train_iters`` through the
tokens per optimizer step (global batch x seq_length); the actual tokens and FLOPs (from
``megatron_transmamba.flops``) are recorded with the run. Planning is idempotent: an unchanged
run keeps its folder, a run whose config changed after it started is an error.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass

import yaml

from megatron_transmamba import flops
from megatron_transmamba.scaling.run_folder import RunFolder, write_json_atomic, write_text_atomic
from megatron_transmamba.scaling.sweep_file import SizeSpec, SweepSpec
from megatron_transmamba.training.config import build_run_config, merge


@dataclass
class PlannedRun:
    name: str
    folder: RunFolder
    config: dict
    """The resolved run config, as written to config.yaml."""
    record: dict
    """What run.json holds: family, size, budget, seed, shape, parameters, tokens, FLOPs."""


def default_output_dir(spec: SweepSpec) -> str:
    return spec.output_dir or os.path.join("runs", "sweeps", spec.name)


def pattern_for_depth(unit: str, depth: int) -> str:
    """``unit`` cycled until it holds ``depth`` mixer layers, each with its trailing ``-``."""
    mixers_per_unit = sum(s != "-" for s in unit)
    text = unit * (depth // mixers_per_unit + 2)
    out, mixers = [], 0
    for symbol in text:
        if symbol != "-":
            if mixers == depth:
                break
            mixers += 1
        out.append(symbol)
    return "".join(out)


def _round_up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple - 1e-9) * multiple)


def model_shape(size: SizeSpec, value: int) -> tuple[int, dict]:
    """(depth, model fields) of knob value ``value``."""
    if size.knob == "depth":
        depth, hidden = value, _round_up(value * size.aspect_ratio, size.head_dim)
    else:
        depth, hidden = size.depth, value
    heads = hidden // size.head_dim
    if heads % size.group_size:
        raise ValueError(f"size {value}: {heads} heads are not divisible by size.group_size={size.group_size}")
    return depth, {
        "hidden_size": hidden,
        "ffn_hidden_size": _round_up(size.ffn_ratio * hidden, size.multiple_of),
        "num_attention_heads": heads,
        "kv_channels": size.head_dim,
        "mamba_num_heads": heads,
        "mamba_head_dim": size.head_dim,
        "mamba_num_groups": heads // size.group_size,
        "mamba_state_dim": size.state_dim or size.head_dim,
    }


def _short(x: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if x >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def budget_label(kind: str, value: float) -> str:
    if kind == "tokens":
        return "D" + _short(value)
    if kind == "flops":
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"C{float(mantissa):g}e{int(exponent)}"
    return f"r{value:g}"


def _plain(value):
    """YAML-safe copy: tuples become lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _vocab_size(cfg) -> int:
    from megatron_transmamba.data.tokenizer import build_tokenizer
    from megatron_transmamba.training.pretrain import pad_vocab_size
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
    return pad_vocab_size(tokenizer.vocab_size, cfg.training.make_vocab_size_divisible_by,
                          cfg.parallel.tensor_model_parallel_size)


def _model_config(cfg):
    from megatron_transmamba.training.pretrain import build_model_config
    return build_model_config(cfg, use_bf16=False)


def expand(spec: SweepSpec, out_dir: str) -> list[PlannedRun]:
    """Every run of the sweep, in launch order (family, size, budget, seed), nothing written."""
    out_dir = os.path.abspath(out_dir)
    base = _plain(spec.base)
    runs, names = [], set()
    for family in spec.families:
        for value in spec.size.values:
            depth, shape = model_shape(spec.size, value)
            pattern = family.layer_pattern or pattern_for_depth(family.pattern_unit, depth)
            model = {**shape, "layer_pattern": pattern}
            schedule = family.transpoint_schedule or ("v9" if "T" in pattern else None)
            if schedule:
                model["transpoint_schedule"] = schedule
            if family.transpoint_values is not None:
                model["transpoint_values"] = list(family.transpoint_values)
            raw = merge(base, {"model": model})
            raw = merge(raw, _plain(family.overrides))
            raw = merge(raw, _plain(spec.size.per_size.get(value, {})))
            where = f"family {family.name}, {spec.size.knob} {value}"
            try:   # train_iters comes later, from the budget; the probe only needs the shape
                probe = build_run_config(merge(raw, {"training": {"train_iters": 10**9}}))
                model_config = _model_config(probe)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            vocab = _vocab_size(probe)
            params = flops.count_parameters(model_config, vocab)
            flops_per_token = flops.training_flops_per_token(model_config, vocab)
            t, par = probe.training, probe.parallel
            model_parallel = par.tensor_model_parallel_size * par.pipeline_model_parallel_size
            if spec.launch.world_size % model_parallel:
                raise ValueError(f"{where}: launch world size {spec.launch.world_size} is not a multiple "
                                 f"of tensor x pipeline parallel = {model_parallel}")
            global_batch = t.global_batch_size or t.micro_batch_size * (spec.launch.world_size // model_parallel)
            tokens_per_step = global_batch * model_config.seq_length
            for budget in spec.budget.values:
                kind = spec.budget.kind
                target = {"tokens": budget, "flops": budget / flops_per_token,
                          "tokens_per_parameter": budget * params}[kind]
                iters = max(1, round(target / tokens_per_step))
                if iters < spec.schedule.min_train_iters:
                    raise ValueError(
                        f"{where}, budget {kind}={budget:g}: {iters} optimizer steps of {tokens_per_step} "
                        f"tokens < schedule.min_train_iters={spec.schedule.min_train_iters}; raise the "
                        "budget or lower the batch")
                for seed in family.seeds or spec.seeds:
                    name = f"{family.name}-{spec.size.knob[0]}{value}-{budget_label(kind, budget)}-s{seed}"
                    if name in names:
                        raise ValueError(f"run {name} appears twice (repeated budget or seed values?)")
                    names.add(name)
                    folder = RunFolder(os.path.join(out_dir, "runs", name))
                    config = _resolve(raw, spec, folder, iters, global_batch, seed, name)
                    tokens = iters * tokens_per_step
                    record = {
                        "name": name, "family": family.name, "knob": spec.size.knob, "size": value,
                        "budget_kind": kind, "budget": budget, "seed": seed,
                        "layer_pattern": pattern, "depth": depth, "num_layers": len(pattern),
                        "hidden_size": shape["hidden_size"], "ffn_hidden_size": shape["ffn_hidden_size"],
                        "heads": shape["mamba_num_heads"], "transpoint_schedule": schedule,
                        "transpoints": list(model_config.transpoints),
                        "seq_length": model_config.seq_length, "vocab_size": vocab,
                        "params": params,
                        "non_embedding_params": flops.non_embedding_parameters(model_config, vocab),
                        "flops_per_token": flops_per_token, "tokens_per_step": tokens_per_step,
                        "global_batch_size": global_batch, "train_iters": iters, "tokens": tokens,
                        "flops": flops_per_token * tokens, "world_size": spec.launch.world_size,
                        "keep_checkpoints": spec.schedule.keep_checkpoints,
                    }
                    runs.append(PlannedRun(name, folder, config, record))
    return runs


def _resolve(raw: dict, spec: SweepSpec, folder: RunFolder, iters: int, global_batch: int,
             seed: int, name: str) -> dict:
    training = dict(raw.get("training") or {})
    if training.get("eval_interval") == 0:
        raise ValueError(f"run {name}: training.eval_interval=0, but the sweep needs the final "
                         "validation loss")
    training.setdefault("eval_interval", iters)
    training.update(train_iters=iters, seed=seed, global_batch_size=global_batch)
    if spec.schedule.warmup_fraction is not None:
        training["lr_warmup_iters"] = min(iters - 1, round(spec.schedule.warmup_fraction * iters))
    checkpoint = dict(raw.get("checkpoint") or {})
    # A relaunch resumes the run from its newest checkpoint.
    checkpoint.update(save=folder.checkpoint_dir, resume=True)
    checkpoint.setdefault("keep_last", 1)
    data = dict(raw.get("data") or {})
    data["cache_dir"] = (folder.file("data_cache") if spec.schedule.data_cache == "per_run" else
                         os.path.abspath(data.get("cache_dir") or ".cache/megatron_transmamba"))
    logging = dict(raw.get("logging") or {})
    logging.setdefault("tensorboard_dir", folder.file("tensorboard"))
    resolved = merge(raw, {"training": training, "checkpoint": checkpoint, "data": data,
                           "logging": logging})
    try:
        cfg = build_run_config(resolved)
    except ValueError as err:
        raise ValueError(f"run {name}: {err}") from None
    return _plain(cfg.to_dict())


def config_text(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def write_plan(spec: SweepSpec, out_dir: str, runs: list[PlannedRun]) -> None:
    """Create or refresh the run folders; refuse to change the config of a run that started."""
    out_dir = os.path.abspath(out_dir)
    for run in runs:
        text = config_text(run.config)
        if os.path.exists(run.folder.config_path):
            with open(run.folder.config_path) as f:
                old = f.read()
            if old != text and run.folder.has_progress():
                diff = [line for line in difflib.unified_diff(old.splitlines(), text.splitlines(),
                                                              lineterm="", n=0)
                        if line[:1] in "+-" and line[:3] not in ("+++", "---")]
                raise ValueError(f"run {run.name} has results or checkpoints, but its config "
                                 f"changed: {'; '.join(diff[:6])}. Use another output_dir, or delete "
                                 f"{run.folder.path} to retrain it")
            if old == text:
                continue
        write_text_atomic(run.folder.config_path, text)
        write_json_atomic(run.folder.file("run.json"), run.record)
    write_text_atomic(os.path.join(out_dir, "sweep.yaml"),
                      yaml.safe_dump(_plain(spec.to_dict()), sort_keys=False))
    write_json_atomic(os.path.join(out_dir, "plan.json"),
                      {"sweep": spec.name, "runs": [r.record for r in runs]})


def plan_sweep(spec: SweepSpec, out_dir: str | None = None) -> tuple[str, list[PlannedRun]]:
    """Expand and write the sweep; returns (output folder, runs)."""
    out_dir = os.path.abspath(out_dir or default_output_dir(spec))
    runs = expand(spec, out_dir)
    write_plan(spec, out_dir, runs)
    return out_dir, runs
