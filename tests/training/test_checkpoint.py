"""Checkpoint files without a process group: complete folders only, layout checked on resume."""

import os

import pytest
import torch

from megatron_transmamba.training import checkpoint as ckpt

LAYOUT = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}


def test_save_writes_rank_files_and_layout(tmp_path):
    path = ckpt.save_checkpoint(str(tmp_path), 3, {"x": torch.ones(2)}, layout=LAYOUT)
    assert sorted(os.listdir(path)) == ["layout.json", "rank_00000.pt"]
    state = ckpt.load_latest_checkpoint(str(tmp_path), LAYOUT)
    assert state["step"] == 3 and torch.equal(state["x"], torch.ones(2))


def test_incomplete_folders_are_ignored(tmp_path):
    ckpt.save_checkpoint(str(tmp_path), 3, {"x": 1}, layout=LAYOUT)
    partial = tmp_path / "iter_0000005"            # rank files but no layout.json: a crash
    partial.mkdir()
    torch.save({"format_version": 2, "step": 5}, partial / "rank_00000.pt")
    assert ckpt.load_latest_checkpoint(str(tmp_path), LAYOUT)["step"] == 3


def test_resume_at_another_layout_names_the_difference(tmp_path):
    ckpt.save_checkpoint(str(tmp_path), 3, {"x": 1}, layout=LAYOUT)
    with pytest.raises(ValueError, match=r"tensor_model_parallel_size 1 \(this run: 2\).*issue #6"):
        ckpt.load_latest_checkpoint(str(tmp_path), {**LAYOUT, "tensor_model_parallel_size": 2})


def test_format_1_single_process_checkpoint_loads(tmp_path):
    folder = tmp_path / "iter_0000002"
    folder.mkdir()
    torch.save({"format_version": 1, "step": 2, "x": 7}, folder / "state.pt")
    assert ckpt.load_latest_checkpoint(str(tmp_path), LAYOUT)["x"] == 7
