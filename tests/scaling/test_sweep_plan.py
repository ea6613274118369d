"""Sweep files and grid expansion: checked keys, shapes from one knob, budgets to train_iters,
resolved run configs that load back, idempotent re-planning."""

import copy
import os

import pytest
import yaml

from megatron_transmamba import flops
from megatron_transmamba.scaling.plan import (budget_label, expand, model_shape, pattern_for_depth,
                                              plan_sweep)
from megatron_transmamba.scaling.sweep_file import SizeSpec, build_sweep, load_sweep
from megatron_transmamba.training.config import load_run_config
from megatron_transmamba.training.pretrain import build_model_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "examples", "sweeps", "tiny_cpu.yaml")
GPU = os.path.join(REPO, "examples", "sweeps", "gpu_scaling.yaml")


def raw_tiny():
    with open(TINY) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("unit, depth, want", [
    ("T-", 3, "T-T-T-"), ("*-", 1, "*-"), ("M-M-*-", 4, "M-M-*-M-"), ("T", 3, "TTT"),
    ("M-*", 3, "M-*M-"), ("M-M-M-*-", 6, "M-M-M-*-M-M-"),
])
def test_pattern_unit_repeats_to_the_depth(unit, depth, want):
    assert pattern_for_depth(unit, depth) == want


def test_depth_knob_derives_nanochat_style_shapes():
    size = SizeSpec(knob="depth", values=[6], aspect_ratio=64, head_dim=64, ffn_ratio=8 / 3,
                    multiple_of=64, group_size=2)
    depth, shape = model_shape(size, 6)
    assert depth == 6 and shape["hidden_size"] == 384 and shape["ffn_hidden_size"] == 1024
    assert shape["mamba_num_heads"] == shape["num_attention_heads"] == 6
    assert shape["mamba_num_groups"] == 3 and shape["mamba_head_dim"] == shape["mamba_state_dim"] == 64
    assert model_shape(SizeSpec(knob="depth", aspect_ratio=50, head_dim=64), 3)[1]["hidden_size"] == 192


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["size"].update(knobb="width"), "did you mean 'knob'"),
    (lambda r: r.update(famlies=[]), "did you mean 'families'"),
    (lambda r: r["families"][0].update(layer_pattern="T-T-"), "exactly one of pattern_unit"),
    (lambda r: r["families"][0].update(pattern_unit="X-"), "pattern 'X-'"),
    (lambda r: r["families"][1].update(name="transmamba"), "unique"),
    (lambda r: r["size"].update(values=[30]), "multiples of size.head_dim"),
    (lambda r: r["budget"].update(flops=[1e9]), "exactly one of"),
    (lambda r: r["budget"].update(tokens=[-1]), "positive number"),
    (lambda r: r["launch"].update(mode="lsf"), "launch.mode"),
])
def test_bad_sweep_files_name_the_problem(edit, message):
    raw = raw_tiny()
    edit(raw)
    with pytest.raises(ValueError, match=message):
        build_sweep(raw)


def test_budgets_become_train_iters_and_flops_come_from_the_library(tmp_path):
    raw = raw_tiny()
    raw["budget"] = {"flops": ["3e9"]}        # YAML 1.1 reads 3e9 as a string
    spec = build_sweep(raw)
    runs = expand(spec, str(tmp_path))
    assert len(runs) == 2 * 3 and budget_label("flops", 3e9) == "C3e9"
    for run in runs:
        cfg = load_run_config(None, [])  # defaults, to build the model config from the run's dict
        cfg.model = run.config["model"]
        model_config = build_model_config(cfg, use_bf16=False)
        rec = run.record
        assert rec["params"] == flops.count_parameters(model_config, 320)
        assert rec["flops_per_token"] == flops.training_flops_per_token(model_config, 320)
        assert rec["train_iters"] == round(3e9 / rec["flops_per_token"] / 256)
        assert rec["tokens"] == rec["train_iters"] * 256 and rec["flops"] == pytest.approx(
            rec["tokens"] * rec["flops_per_token"])
    raw["budget"] = {"tokens_per_parameter": [0.01]}   # ~2 steps
    with pytest.raises(ValueError, match="min_train_iters"):
        expand(build_sweep(raw), str(tmp_path))


def test_run_configs_are_resolved_and_load_back(tmp_path):
    raw = raw_tiny()
    raw["families"][0]["overrides"] = {"training": {"lr": 1.0e-3}}
    raw["size"]["per_size"] = {64: {"model": {"ssd_chunk_size": 16}}}
    out, runs = plan_sweep(build_sweep(raw), str(tmp_path / "sweep"))
    assert sorted(os.listdir(os.path.join(out, "runs"))) == sorted(r.name for r in runs)
    run = next(r for r in runs if r.name == "transmamba-w64-D12.3K-s1")
    cfg = load_run_config(run.folder.config_path)
    assert cfg.model["layer_pattern"] == "T-T-" and cfg.model["hidden_size"] == 64
    assert cfg.model["transpoint_values"] == [16, 48] and cfg.model["ssd_chunk_size"] == 16
    assert cfg.training.train_iters == 48 and cfg.training.lr_warmup_iters == 5
    assert cfg.training.lr == 1.0e-3 and cfg.training.seed == 1 and cfg.training.eval_interval == 48
    assert cfg.checkpoint.save == run.folder.checkpoint_dir and cfg.checkpoint.resume
    assert os.path.isabs(cfg.data.cache_dir)
    transformer = load_run_config(os.path.join(out, "runs", "transformer-w32-D6.14K-s1", "config.yaml"))
    assert transformer.model["layer_pattern"] == "*-*-" and transformer.training.lr == 3.0e-3
    assert load_sweep(os.path.join(out, "sweep.yaml")).to_dict() == build_sweep(raw).to_dict()


def test_replanning_keeps_runs_and_refuses_to_change_a_started_one(tmp_path):
    raw = raw_tiny()
    out, runs = plan_sweep(build_sweep(raw), str(tmp_path))
    before = {r.name: os.stat(r.folder.config_path).st_mtime_ns for r in runs}
    plan_sweep(build_sweep(copy.deepcopy(raw)), str(tmp_path))
    assert {r.name: os.stat(r.folder.config_path).st_mtime_ns for r in runs} == before
    raw["base"]["training"]["lr"] = 1.0e-3
    plan_sweep(build_sweep(raw), str(tmp_path))           # nothing started: configs are rewritten
    assert load_run_config(runs[0].folder.config_path).training.lr == 1.0e-3
    runs[0].folder.append_segment({"end_step": 3})
    raw["base"]["training"]["lr"] = 2.0e-3
    with pytest.raises(ValueError, match=f"run {runs[0].name} has results or checkpoints"):
        plan_sweep(build_sweep(raw), str(tmp_path))


def test_the_gpu_example_plans(tmp_path):
    spec = load_sweep(GPU)
    runs = expand(spec, str(tmp_path))
    assert len(runs) == 4 * 5 * 3
    by_family = {r.record["family"]: r for r in runs if r.record["size"] == 8}
    assert by_family["hybrid"].record["layer_pattern"] == "M-M-M-*-M-M-M-*-"
    assert by_family["transmamba"].record["hidden_size"] == 512
    big = next(r for r in runs if r.record["size"] == 16)
    assert big.config["training"]["lr"] == 6.0e-4 and big.config["training"]["global_batch_size"] == 128
    assert all(r.record["train_iters"] >= 200 for r in runs)
    assert big.config["data"]["cache_dir"] == big.folder.file("data_cache")   # schedule.data_cache: per_run
