"""Checkpoints really saved by TP = 2 and PP = 2 training runs (torchrun, 2 gloo processes each)
export to the same Hugging Face tensors as the same weights saved at TP = 1, and a Hugging Face
folder imported once trains at PP = 2.

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


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The TP = 1, TP = 2 and PP = 2 runs (lr = 0), one after another (standalone launches
    may race for a port)."""
    tmp_path = tmp_path_factory.mktemp("parallel_export")
    run = {**RUN_CONFIG, "data": {"tokenizer": "byte"},
           "training": {"micro_batch_size": 2, "train_iters": 1, "lr": 0.0, "min_lr": 0.0,
                        "lr_warmup_iters": 0, "eval_interval": 0, "eval_iters": 1,
                        "log_interval": 1, "precision": "fp32", "make_vocab_size_divisible_by": 4},
           "logging": {"progress_bar": False}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    for name, (nproc, layout) in LAYOUTS.items():
        result = launch(tmp_path / "run.yaml", tmp_path / name, nproc, layout)
        assert result.returncode == 0, f"{name} run failed:\n{(result.stdout + result.stderr)[-4000:]}"
    return tmp_path


def test_tp2_and_pp2_saved_checkpoints_export_like_tp1(saved, tmp_path):
    for name, (tp, pp) in (("tp2", (2, 1)), ("pp2", (1, 2))):
        newest = ckpt.checkpoint_dirs(str(saved / name))[-1][1]
        layout = ckpt.read_info(newest)["layout"]
        assert (layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"]) == (tp, pp)

    reference, _, _, _ = E.read_checkpoint(str(saved / "tp1"))
    assert reference["output_layer.weight"].shape[0] == VOCAB
    for name in ("tp2", "pp2"):
        merged, _, _, _ = E.read_checkpoint(str(saved / name))
        assert merged.keys() == reference.keys()
        for key, value in merged.items():
            assert torch.equal(value, reference[key]), f"{name}: {key}"
    exported = {}
    for name in ("tp1", "tp2", "pp2"):
        E.export_checkpoint(str(saved / name), str(tmp_path / f"hf-{name}"), tolerance=1e-4)
        exported[name] = E.read_safetensors(str(tmp_path / f"hf-{name}"))
    for name in ("tp2", "pp2"):
        assert exported[name].keys() == exported["tp1"].keys()
        assert all(torch.equal(exported[name][k], exported["tp1"][k]) for k in exported["tp1"])


def test_imported_checkpoint_trains_at_pp2(saved, tmp_path):
    """A Hugging Face folder imported once (a model-only checkpoint, dist_checkpointing) trains
    at PP = 2 without naming a layout at import: lr = 0 keeps the weights, so the checkpoint the
    PP = 2 run saves must hold exactly the imported tensors."""
    E.export_checkpoint(str(saved / "tp1"), str(tmp_path / "hf"), verify_logits=False)
    E.import_hf(str(tmp_path / "hf"), str(tmp_path / "imported"))
    reference, _, _, _ = E.read_checkpoint(str(tmp_path / "imported"))
    result = launch(saved / "run.yaml", tmp_path / "imported", 2,
                    ["--parallel.pipeline_model_parallel_size=2", "--checkpoint.resume=true"])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "starting from the weights of the model-only checkpoint" in output
    assert "layout TP=1 x PP=2 x DP=1 = 2 ranks" in output
    trained, _, _, step = E.read_checkpoint(str(tmp_path / "imported"))
    assert step == 1 and trained.keys() == reference.keys()
    for key, value in trained.items():
        assert torch.equal(value, reference[key]), key
