"""Checkpoints really saved by TP = 2 and PP = 2 training runs (torchrun, 2 gloo processes each)
export to the same Hugging Face tensors as the same weights saved at TP = 1.

The runs use lr = 0, so they save their initial weights, which do not depend on the layout (the
model draws them at full size and cuts them per rank, each part from its own seed; see
tests/parallel): the merged tensors must equal the TP = 1 ones exactly.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megatron_transmamba.hf import export as E
from megatron_transmamba.training import checkpoint as ckpt

from test_hf import RUN_CONFIG, VOCAB

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="gloo/CPU launch")


LAYOUTS = {"tp2": (2, ["--parallel.tensor_model_parallel_size=2"]),
           "pp2": (2, ["--parallel.pipeline_model_parallel_size=2"]),
           "tp1": (1, [])}


def launch(config: Path, save: Path, nproc: int, layout: list) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "examples/pretrain.py", "--config", str(config),
               f"--checkpoint.save={save}", f"--data.cache_dir={save}-data", *layout]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_tp2_and_pp2_saved_checkpoints_export_like_tp1(tmp_path):
    run = {**RUN_CONFIG, "data": {"tokenizer": "byte"},
           "training": {"micro_batch_size": 2, "train_iters": 1, "lr": 0.0, "min_lr": 0.0,
                        "lr_warmup_iters": 0, "eval_interval": 0, "eval_iters": 1,
                        "log_interval": 1, "precision": "fp32", "make_vocab_size_divisible_by": 4},
           "logging": {"progress_bar": False}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    for name, (nproc, layout) in LAYOUTS.items():     # one after the other: standalone launches
        result = launch(tmp_path / "run.yaml", tmp_path / name, nproc, layout)   # may race for a port
        assert result.returncode == 0, f"{name} run failed:\n{(result.stdout + result.stderr)[-4000:]}"
    for name in ("tp2", "pp2"):
        saved = ckpt.checkpoint_dirs(str(tmp_path / name))[-1][1]
        assert sorted(os.listdir(saved)) == ["layout.json", "rank_00000.pt", "rank_00001.pt"]
    stage1 = torch.load(tmp_path / "pp2" / "iter_0000001" / "rank_00001.pt", weights_only=False)["model"]
    assert "embedding.word_embeddings.weight" not in stage1 and "output_layer.weight" in stage1

    reference, _, _, _ = E.read_checkpoint(str(tmp_path / "tp1"))
    assert reference["output_layer.weight"].shape[0] == VOCAB
    for name in ("tp2", "pp2"):
        merged, _, _, _ = E.read_checkpoint(str(tmp_path / name))
        assert merged.keys() == reference.keys()
        for key, value in merged.items():
            assert torch.equal(value, reference[key]), f"{name}: {key}"
    exported = {}
    for name in ("tp1", "tp2", "pp2"):
        E.export_checkpoint(str(tmp_path / name), str(tmp_path / f"hf-{name}"), tolerance=1e-4)
        exported[name] = E.read_safetensors(str(tmp_path / f"hf-{name}"))
    for name in ("tp2", "pp2"):
        assert exported[name].keys() == exported["tp1"].keys()
        assert all(torch.equal(exported[name][k], exported["tp1"][k]) for k in exported["tp1"])
