"""Checkpoints in one process: what a checkpoint holds, damaged checkpoints, a model of another
shape, other formats, NaN/inf handling, SIGTERM and asynchronous saves.

Resuming is checked bitwise against an uninterrupted run (one process, float32 on CPU). The
multi-process cases (another layout, kill -9, SIGTERM through torchrun) are in
test_checkpoint_parallel.py.
"""

import importlib.util
import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from checkpoint_common import TRAIN_ITERS, copy_checkpoint, run_config
from megatron_transmamba.training import checkpoint as ckpt
from megatron_transmamba.training import pretrain as P
from megatron_transmamba.training import trainer as training_loop
from megatron_transmamba.training.config import build_run_config

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """An uninterrupted run of 6 steps that saves at steps 2, 4 and 6 (all kept)."""
    save = tmp_path_factory.mktemp("reference") / "ckpt"
    result = P.pretrain(run_config(cache, save, eval_interval=TRAIN_ITERS, eval_iters=2))
    return {"save": save, "result": result, "losses": result.train_losses}


def inject(monkeypatch, faults: dict, micro_batches: int = 4):
    """Make the first micro-batch of the given (1-based) steps fail: 'loss' gives a NaN loss,
    'grad' a finite loss whose gradients are NaN, 'sigterm' sends this process SIGTERM."""
    real = training_loop.lm_forward_step
    calls = {"n": 0}

    def forward_step(data_iterator, model, device, **kwargs):
        calls["n"] += 1
        losses, loss_func = real(data_iterator, model, device, **kwargs)
        step, micro = divmod(calls["n"] - 1, micro_batches)
        fault = faults.get(step + 1) if micro == 0 else None
        if fault == "loss":
            losses = losses * float("nan")
        elif fault == "grad":
            losses.register_hook(lambda grad: grad * float("nan"))
        elif fault == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        return losses, loss_func

    monkeypatch.setattr(training_loop, "lm_forward_step", forward_step)


def test_a_checkpoint_holds_the_training_state(reference):
    save = reference["save"]
    assert [step for step, _ in ckpt.checkpoint_dirs(str(save))] == [2, 4, 6]
    assert reference["result"].saved == [str(save / f"iter_{s:07d}") for s in (2, 4, 6)]
    assert (save / "latest").read_text() == "6\n"
    path = str(save / "iter_0000006")
    files = sorted(os.listdir(path))
    assert {".metadata", "checkpoint.json", "common.pt", "metadata.json"} <= set(files)
    assert any(f.endswith(".distcp") for f in files) and not any(".tmp" in f for f in files)
    info = ckpt.read_info(path)
    assert (info["format_version"], info["step"], info["consumed_samples"]) == (3, 6, 48)
    assert info["tokens_seen"] == 48 * 32 and info["model_only"] is False
    assert info["layout"]["tensor_model_parallel_size"] == 1
    assert info["layout"]["use_distributed_optimizer"] is True
    assert info["config"]["model"]["layer_pattern"] == "T-M-*-"
    assert sorted(info["files"]) == [f for f in files if f != "checkpoint.json"]
    assert ckpt.verify(path) == []
    common = ckpt.load_common_state(path)
    assert common["train_state"] == {"step": 6, "consumed_samples": 48}
    assert common["scheduler"]["num_steps"] == 6
    tensors = ckpt.tensor_metadata(path)
    for kind in ("exp_avg", "exp_avg_sq", "param"):         # Adam moments and fp32 main weights
        assert f"optimizer.state.{kind}.layers.0.mixer.in_proj.weight.z" in tensors
    assert tensors["layers.0.mixer.in_proj.weight.z"] == ((4 * 8, 32), torch.float32)


def test_inspection_tool(reference, capsys):
    spec = importlib.util.spec_from_file_location(
        "inspect_checkpoint", REPO_ROOT / "tools/checkpoint/inspect_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(reference["save"]), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "iter_0000006 (format 3)" in text and "48 samples, 1,536 tokens seen" in text
    assert "TP=1 x PP=1 x DP=1 (1 ranks), distributed optimizer" in text
    assert "layers.0.mixer.in_proj.weight.dt" in text and "(4, 32)" in text
    assert "optimizer state: exp_avg, exp_avg_sq, param per model tensor" in text
    assert "verified: sizes and CRC-32 match" in text
    d = tool.describe(str(reference["save"] / "iter_0000002"))
    assert d["step"] == 2 and d["model_tensors"]["embedding.word_embeddings.weight"] == {
        "shape": [320, 32], "dtype": "float32"}
    assert d["model_parameters"] == reference["result"].num_parameters


def test_damaged_checkpoints_are_skipped_for_the_previous_one(reference, cache, tmp_path,
                                                              capsys):
    """iter 6 truncated, iter 4 changed in place (same size), an unfinished iter 8: resume takes
    iter 2 and repeats the uninterrupted run's losses bitwise."""
    save = tmp_path / "ckpt"
    shutil.copytree(reference["save"], save)
    distcp = sorted((save / "iter_0000006").glob("*.distcp"))[0]
    distcp.write_bytes(distcp.read_bytes()[:1000])
    changed = sorted((save / "iter_0000004").glob("*.distcp"))[0]
    data = bytearray(changed.read_bytes())
    data[-100] ^= 0xFF
    changed.write_bytes(bytes(data))
    assert ckpt.verify(str(save / "iter_0000004")) == [
        f"{changed.name}: CRC-32 differs from the one written at save time"]
    (save / "iter_0000008.tmp").mkdir()                # a save cut short: never read
    (save / "iter_0000008.tmp" / "__0_0.distcp").write_bytes(b"partial")

    resumed = P.pretrain(run_config(cache, save, resume=True))
    out = capsys.readouterr().out
    assert f"iter_0000006 is damaged ({distcp.name} has 1000 bytes, expected" in out
    assert "iter_0000004 is damaged" in out and "resuming from step 2" in out
    assert "removing the incomplete checkpoint iter_0000008.tmp" in out
    assert not (save / "iter_0000008.tmp").exists()
    assert resumed.resumed_from == str(save / "iter_0000002")
    assert sorted(resumed.train_losses) == [3, 4, 5, 6]
    for step, loss in resumed.train_losses.items():
        assert loss == reference["losses"][step], step
    assert (save / "iter_0000006.corrupt").is_dir() and (save / "iter_0000004.corrupt").is_dir()
    assert [s for s, _ in ckpt.checkpoint_dirs(str(save))] == [2, 4, 6]    # saved again
    # the same step damaged again: its copy gets a name of its own, the resume goes on
    distcp = sorted((save / "iter_0000006").glob("*.distcp"))[0]
    distcp.write_bytes(distcp.read_bytes()[:1000])
    again = P.pretrain(run_config(cache, save, resume=True))
    assert again.resumed_from == str(save / "iter_0000004")
    assert "moved to iter_0000006.corrupt.1" in capsys.readouterr().out
    assert (save / "iter_0000006.corrupt").is_dir() and (save / "iter_0000006.corrupt.1").is_dir()


def test_export_and_generation_read_only_intact_checkpoints(reference, tmp_path, capsys):
    """Outside the trainer (HF export, examples/generate.py) a checkpoint is verified before it
    is read: a byte-flipped one named directly is refused, naming the file; in a save folder
    the newest intact one is taken; a truncated one never reaches the tensor loader."""
    import importlib
    import sys as system

    from megatron_transmamba.hf import export as E

    save = tmp_path / "ckpt"
    shutil.copytree(reference["save"], save)
    changed = sorted((save / "iter_0000006").glob("*.distcp"))[0]
    data = bytearray(changed.read_bytes())
    data[-100] ^= 0xFF
    changed.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=rf"iter_0000006 is damaged: {changed.name}: "
                       r"CRC-32 differs.*an older one: .*iter_0000004"):
        E.read_checkpoint(str(save / "iter_0000006"))
    _, _, _, step = E.read_checkpoint(str(save))
    assert step == 4 and "iter_0000006 is damaged" in capsys.readouterr().err
    truncated = sorted((save / "iter_0000004").glob("*.distcp"))[0]
    truncated.write_bytes(truncated.read_bytes()[:1000])
    system.path.insert(0, str(REPO_ROOT / "tools" / "hf"))
    convert = importlib.import_module("convert")
    assert convert.main(["export", str(save / "iter_0000004"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{truncated.name} has 1000 bytes" in err[0], err
    assert not (tmp_path / "hf").exists()


def test_only_damaged_checkpoints_is_an_error(reference, tmp_path):
    save = tmp_path / "ckpt"
    copy_checkpoint(reference["save"], 6, save)
    (save / "iter_0000006" / "common.pt").write_bytes(b"")
    checkpointer = ckpt.Checkpointer(str(save), None, {}, {}, 32, log=lambda text: None)
    with pytest.raises(ckpt.CheckpointError, match=r"no usable checkpoint in .*common\.pt has 0 "
                                                   r"bytes, expected"):
        checkpointer.load(None, None, None)


def test_a_checkpoint_of_another_model_shape_names_the_tensor(reference, cache, tmp_path):
    save = tmp_path / "ckpt"
    copy_checkpoint(reference["save"], 2, save)
    with pytest.raises(ckpt.CheckpointError) as error:
        P.pretrain(run_config(cache, save, resume=True, model={"ffn_hidden_size": 32}))
    message = str(error.value)
    assert "does not fit this model (the run config's model section differs: ffn_hidden_size: " \
           "64 in the checkpoint, 32 now)" in message
    assert "tensor 'layers.1.mlp.linear_fc2.weight' has shape (32, 64) in the checkpoint, the " \
           "model expects (32, 32)" in message
    assert not os.path.exists(save / "iter_0000002.corrupt")       # not mistaken for damage


@pytest.mark.parametrize("marker, version", [("layout.json", "2"), ("state.pt", "1"),
                                             ("checkpoint.json", "7")])
def test_another_format_is_named_not_taken_for_damage(reference, tmp_path, marker, version):
    """Folders of the formats before dist_checkpointing (``layout.json``, ``state.pt``) or of an
    unknown ``format_version`` fail in one line, on resume, export and inspection alike."""
    save = tmp_path / "ckpt"
    shutil.copytree(reference["save"] / "iter_0000002", save / "iter_0000002")
    folder = save / "iter_0000004"
    folder.mkdir()
    (folder / marker).write_text(json.dumps({"format_version": int(version)}))
    message = rf"checkpoint {folder} is in format {version}, .* reads format 3 only"
    checkpointer = ckpt.Checkpointer(str(save), None, {}, {}, seq_length=32)
    with pytest.raises(ckpt.UnsupportedFormatError, match=message):
        checkpointer.load([], None, None)
    with pytest.raises(ckpt.UnsupportedFormatError, match=message):
        ckpt.resolve_verified(str(save))
    with pytest.raises(ckpt.UnsupportedFormatError, match=message) as error:
        ckpt.read_info(str(folder))
    assert "\n" not in str(error.value)
    assert folder.is_dir() and [s for s, _ in ckpt.checkpoint_dirs(str(save))] == [2, 4]


def test_nan_loss_and_nan_gradient_skip_the_update(reference, cache, monkeypatch, capsys):
    inject(monkeypatch, {2: "loss", 4: "grad"})
    result = P.pretrain(run_config(cache, nan_action="skip"))
    assert result.skipped_steps == [2, 4]
    assert math.isnan(result.train_losses[2]) and math.isnan(result.grad_norms[2])
    assert math.isfinite(result.train_losses[4]) and math.isnan(result.grad_norms[4])
    assert all(math.isfinite(result.train_losses[s]) for s in (1, 3, 5, 6))
    assert result.train_losses[1] == reference["losses"][1]
    out = capsys.readouterr().out
    assert "step 4: loss" in out and "gradient norm nan is not finite: update skipped " \
                                     "(training.nan_action='skip', 1 in a row)" in out


@pytest.mark.parametrize("action, faults, stopped_at", [("stop", {3: "grad"}, 3),
                                                        ("skip", {3: "loss", 4: "loss"}, 4)])
def test_nan_stops_after_saving_the_last_good_state(reference, cache, tmp_path, monkeypatch,
                                                    action, faults, stopped_at):
    inject(monkeypatch, faults)
    save = tmp_path / "ckpt"
    with pytest.raises(P.TrainingDivergedError) as error:
        P.pretrain(run_config(cache, save, nan_action=action, nan_skip_limit=2,
                              checkpoint={"save_interval": 100}))
    good = 2 if action == "stop" else 3                 # the skipped step 3 is counted
    assert f"step {stopped_at}: loss" in str(error.value)
    assert f"the last good state (step {good}) is the checkpoint iter_{good:07d}" in str(error.value)
    assert [s for s, _ in ckpt.checkpoint_dirs(str(save))] == [good]
    assert ckpt.verify(str(save / f"iter_{good:07d}")) == []
    assert ckpt.read_info(str(save / f"iter_{good:07d}"))["consumed_samples"] == 8 * good


def test_sigterm_saves_a_checkpoint_and_stops(reference, cache, tmp_path, monkeypatch):
    inject(monkeypatch, {3: "sigterm"})
    save = tmp_path / "ckpt"
    before = signal.getsignal(signal.SIGTERM)
    stopped = P.pretrain(run_config(cache, save, checkpoint={"save_interval": 100}))
    assert stopped.stop_reason == "SIGTERM" and sorted(stopped.train_losses) == [1, 2, 3]
    assert stopped.saved == [str(save / "iter_0000003")]
    assert ckpt.verify(stopped.saved[0]) == []
    assert signal.getsignal(signal.SIGTERM) is before                # handler removed again
    monkeypatch.undo()
    resumed = P.pretrain(run_config(cache, save, resume=True))
    for step, loss in {**stopped.train_losses, **resumed.train_losses}.items():
        assert loss == reference["losses"][step], step


def test_async_save_resumes_exactly(reference, cache, tmp_path):
    save = tmp_path / "ckpt"
    stopped = P.pretrain(run_config(cache, save, exit_at_step=4,
                                    checkpoint={"async_save": True, "keep_last": 1}))
    assert stopped.saved == [str(save / "iter_0000002"), str(save / "iter_0000004")]
    assert [s for s, _ in ckpt.checkpoint_dirs(str(save))] == [4]       # keep_last: 1
    assert ckpt.verify(str(save / "iter_0000004")) == []
    resumed = P.pretrain(run_config(cache, save, resume=True, checkpoint={"async_save": True}))
    assert sorted(resumed.train_losses) == [5, 6]
    for step, loss in {**stopped.train_losses, **resumed.train_losses}.items():
        assert loss == reference["losses"][step], step


def test_replicated_optimizer_resumes_exactly_and_cannot_switch(reference, cache, tmp_path):
    save = tmp_path / "ckpt"
    replicated = {"use_distributed_optimizer": False}
    stopped = P.pretrain(run_config(cache, save, exit_at_step=3, parallel=replicated))
    resumed = P.pretrain(run_config(cache, save, resume=True, parallel=replicated))
    assert sorted(resumed.train_losses) == [4, 5, 6]
    for step, loss in {**stopped.train_losses, **resumed.train_losses}.items():
        assert loss == reference["losses"][step], step
    with pytest.raises(ckpt.CheckpointError, match=r"saved with parallel\.use_distributed_"
                                                   r"optimizer=False: resume with the same"):
        P.pretrain(run_config(cache, save, resume=True, train_iters=8))


@pytest.mark.parametrize("section, values, match", [
    ("training", {"nan_action": "ignore"}, r"training\.nan_action='ignore': expected 'skip' or"),
    ("training", {"nan_skip_limit": -1}, r"training\.nan_skip_limit=-1"),
    ("checkpoint", {"async_save": True}, r"checkpoint\.async_save=true needs checkpoint\.save"),
    ("checkpoint", {"keep_last": -1}, r"checkpoint\.keep_last=-1"),
    ("checkpoint", {"asynch_save": True}, r"did you mean 'async_save'"),
])
def test_checkpoint_and_failure_keys_are_validated(section, values, match):
    with pytest.raises(ValueError, match=match):
        build_run_config({section: values})
