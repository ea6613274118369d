"""Pipeline parallelism of the trainer against one process (gloo, CPU, float32).

The tiny model of ``data_parallel_common.py`` (10 layers ``T-M-*-T-T-``, TransPoints 0, 13 and
T) trains for 5 steps (4 micro-batches of 2 per step) on one process and on 2 pipeline stages:
split evenly (layers 0-4 | 5-9), at a '|' mark (0-2 | 3-9), and interleaved with 2 chunks per
rank (0-2, 6-7 on rank 0; 3-5, 8-9 on rank 1). Every layer keeps its global number, the
initial model does not depend on the split (each part is seeded by its global index), and the
losses and gradient norms repeat the single-process run within 1e-5 (measured: identical up
to float rounding, about 5e-7). Wrong layouts fail before any process group starts.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import torchrun_batch  # noqa: E402
from data_parallel_common import run_config  # noqa: E402
from test_data_parallel import WORKER, losses  # noqa: E402

TOL = 1e-5

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="runs the gloo/CPU path (megatron_adapter's CPU patches)"
)


@pytest.fixture(scope="module")
def reference(one_process_run):
    return one_process_run("data_parallel")


PP2 = torchrun_batch.job(2, WORKER, "pp2", "{out}")


@pytest.fixture(scope="module")
def pp2(torchrun_jobs):
    run = torchrun_jobs(PP2)
    assert "layout TP=1 x PP=2 x DP=1 = 2 ranks" in run.stdout
    assert "layout TP=1 x PP=2 (virtual 2) x DP=1 = 2 ranks" in run.stdout
    return run.ranks()


@pytest.mark.parametrize("case, stages, rank_layers", [
    ("pp2", [[0, 5], [5, 10]], [[[0, 1, 2, 3, 4]], [[5, 6, 7, 8, 9]]]),
    ("pp2_marks", [[0, 3], [3, 10]], [[[0, 1, 2]], [[3, 4, 5, 6, 7, 8, 9]]]),
    ("pp2_interleaved", [[0, 3], [3, 6], [6, 8], [8, 10]],
     [[[0, 1, 2], [6, 7]], [[3, 4, 5], [8, 9]]]),
])
def test_pp2_matches_single_process(reference, pp2, case, stages, rank_layers):
    for rank, runs in enumerate(pp2):
        run = runs[case]
        layout = run["layout"]
        assert layout["pipeline_model_parallel_size"] == 2 and layout["data_parallel_size"] == 1
        assert layout["virtual_pipeline_model_parallel_size"] == (
            2 if case == "pp2_interleaved" else None)
        assert layout["stage_layers"] == stages
        assert layout["rank_layers"] == rank_layers[rank]
        # global layer numbers (1-based), megatron-core's own layers included
        assert layout["layer_numbers"] == [[i + 1 for i in chunk] for chunk in rank_layers[rank]]
        assert run["parameters"] == reference["parameters"]
        assert losses(run["losses"]) == pytest.approx(reference["losses"], abs=TOL), (rank, case)
        assert run["grad_norms"] == pytest.approx(reference["grad_norms"], rel=TOL), (rank, case)


@pytest.mark.parametrize("world_size, parallel, model, training, message", [
    (2, {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 8}, {}, {},
     "16 pipeline stages (pipeline_model_parallel_size x virtual_pipeline_model_parallel_size) "
     "but model.layer_pattern has only 10 layers"),
    (2, {"pipeline_model_parallel_size": 2}, {"layer_pattern": "T-M|-*-T|-T-"}, {},
     "has 3 segments between '|' marks, but the layout has 2 pipeline stages"),
    (2, {"pipeline_model_parallel_size": 2}, {"layer_pattern": "T-M-*-T-T-|"}, {},
     "(one is empty)"),
    (2, {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}, {},
     {"global_batch_size": 6}, "interleaved pipelining needs the micro-batches per step (3)"),
    (2, {}, {}, {"global_batch_size": 6},
     "training.global_batch_size=6 must be a multiple of training.micro_batch_size x "
     "data-parallel size = 2 x 2"),
    (3, {"pipeline_model_parallel_size": 2}, {}, {},
     "world size 3 is not divisible by parallel.tensor_model_parallel_size (1) x "
     "parallel.pipeline_model_parallel_size (2)"),
])
def test_layout_errors_name_the_fields(tmp_path, world_size, parallel, model, training, message):
    """What examples/pretrain.py checks on every rank before any process group starts."""
    from megatron_transmamba.training.pretrain import check_run_config
    cfg = run_config(tmp_path, model=model, **parallel)
    for key, value in training.items():
        setattr(cfg.training, key, value)
    with pytest.raises(ValueError) as error:
        check_run_config(cfg, world_size)
    assert message in str(error.value)


def test_more_stages_than_layers_fails_before_any_process_group(tmp_path):
    """examples/pretrain.py's overrides on its tiny config; what every rank reports before any
    process group starts (the launch that shows it: test_data_parallel.py)."""
    from megatron_transmamba.training.config import load_run_config
    from megatron_transmamba.training.pretrain import check_run_config

    message = ("16 pipeline stages (pipeline_model_parallel_size x "
               "virtual_pipeline_model_parallel_size) but model.layer_pattern has only 8 layers")
    cfg = load_run_config("examples/configs/tiny_cpu.yaml", [
        "--training.global_batch_size=16", "--parallel.pipeline_model_parallel_size=2",
        "--parallel.virtual_pipeline_model_parallel_size=8", f"--data.cache_dir={tmp_path}"])
    with pytest.raises(ValueError) as error:
        check_run_config(cfg, 2)
    assert message in str(error.value)
