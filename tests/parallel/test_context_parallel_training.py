"""Context parallelism (CP) of the trainer against one process (gloo, CPU, float32).

One process trains the tiny model of ``context_parallel_common.py`` for 20 steps. The same
run must repeat its losses at CP = 2, CP = 2 x TP = 2 (sequence parallel), CP = 2 x DP = 2,
CP = 2 x PP = 2 and CP = 2 x PP = 2 x DP = 2; a CP = 2 run stopped at step 10 must resume
from its checkpoint at CP = 1 (in this process) and at CP = 4 with the losses of the
uninterrupted run. With packed documents (``data.reset_at_eod`` on a corpus of short
documents, ``packed_run_config``) CP = 2 must repeat one process's losses over 5 steps.
Tolerance 1e-4 absolute (float32: the state passing, the gathered attention and the CP loss
sum add in another order than one process does; measured below 1e-5 over the 20 steps).
Bad CP layouts fail before any process group starts.
"""

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import golden  # noqa: E402
import torchrun_batch  # noqa: E402
from context_parallel_common import (PACKED_ITERS, STOP_AT, TRAIN_ITERS,  # noqa: E402
                                     run_config)
from test_data_parallel import read_ranks, torchrun  # noqa: E402

WORKER = Path(__file__).with_name("context_parallel_worker.py")
LOSS_TOL = 1e-4

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="runs the gloo/CPU path (megatron_adapter's CPU patches)"
)


def losses(run: dict, first: int = 1) -> list:
    return [run["losses"][str(step)] for step in range(first, TRAIN_ITERS + 1)]


@pytest.fixture(scope="module")
def reference(one_process_run):
    return one_process_run("context_parallel")["losses"]


def copy_cp2_checkpoint(out_dir: Path, launcher) -> None:
    shutil.copytree(launcher(CP2).out_dir / "ckpt", out_dir / "ckpt_cp4")


CP2 = torchrun_batch.job(2, WORKER, "cp2", "{out}", "{out}/short",
                         prepare=lambda out, launcher: golden.packed_corpus(out))
WORLD4 = torchrun_batch.job(4, WORKER, "world4", "{out}", prepare=copy_cp2_checkpoint)


@pytest.fixture(scope="module")
def cp2_runs(torchrun_jobs):
    run = torchrun_jobs(CP2)
    assert "x CP=2 x DP=1 = 2 ranks" in run.stdout
    return run.out_dir, run.ranks()


def test_cp2_matches_one_process(reference, cp2_runs):
    _, ranks = cp2_runs
    for runs in ranks:
        assert runs["cp2"]["layout"]["context_parallel_size"] == 2
        assert losses(runs["cp2"]) == pytest.approx(reference, abs=LOSS_TOL)
        stopped = runs["stopped"]["losses"]
        assert sorted(map(int, stopped)) == list(range(1, STOP_AT + 1))


def test_cp2_with_packed_documents_matches_one_process(cp2_runs, one_process_run):
    _, ranks = cp2_runs
    want = one_process_run("context_parallel_packed")["losses"]     # golden.packed_corpus
    # documents crossed the shard boundary: rank 1's rows continued rank 0's documents
    assert [runs["packed"]["continued"] > 0 for runs in ranks] == [False, True]
    for runs in ranks:
        assert runs["packed"]["layout"]["context_parallel_size"] == 2
        assert runs["packed"]["shards"] == PACKED_ITERS * 2, runs["packed"]   # 2 micro-batches
        got = [runs["packed"]["losses"][str(step)] for step in range(1, PACKED_ITERS + 1)]
        assert got == pytest.approx(want, abs=LOSS_TOL)


def test_cp2_checkpoint_resumes_at_cp1(reference, cp2_runs, tmp_path):
    from megatron_transmamba.training.pretrain import pretrain
    out, _ = cp2_runs
    shutil.copytree(out / "ckpt", tmp_path / "ckpt")
    result = pretrain(run_config(tmp_path, save=str(tmp_path / "ckpt"), resume=True))
    assert sorted(result.train_losses) == list(range(STOP_AT + 1, TRAIN_ITERS + 1))
    resumed = [result.train_losses[step] for step in range(STOP_AT + 1, TRAIN_ITERS + 1)]
    assert resumed == pytest.approx(reference[STOP_AT:], abs=LOSS_TOL)


def test_cp4_resume_and_cp2_with_tp_dp_pp_match_one_process(reference, torchrun_jobs):
    run = torchrun_jobs(WORLD4)     # CP = 4 resumes from a copy of the CP = 2 run's checkpoint
    for line in ("TP=1 x PP=1 x CP=4 x DP=1 = 4 ranks", "TP=2 (SP) x PP=1 x CP=2 x DP=1",
                 "TP=1 x PP=1 x CP=2 x DP=2", "TP=1 x PP=2 x CP=2 x DP=1"):
        assert f"layout {line}" in run.stdout, line
    for runs in run.ranks():
        assert losses(runs["cp4_resumed"], STOP_AT + 1) == pytest.approx(reference[STOP_AT:],
                                                                         abs=LOSS_TOL)
        for name in ("cp2_tp2", "cp2_dp2", "cp2_pp2"):
            assert losses(runs[name]) == pytest.approx(reference, abs=LOSS_TOL), name


def test_cp2_x_pp2_x_dp2_matches_one_process(reference, tmp_path):
    result = torchrun([WORKER, "world8", tmp_path], 8)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "layout TP=1 x PP=2 x CP=2 x DP=2 = 8 ranks" in result.stdout
    for runs in read_ranks(tmp_path, 8):
        assert losses(runs["cp2_pp2_dp2"]) == pytest.approx(reference, abs=LOSS_TOL)


@pytest.mark.parametrize("world_size, parallel, changes, message", [
    (2, {"context_parallel_size": 2}, {"model.seq_length": 33},
     "model.seq_length=33 must be divisible by parallel.context_parallel_size=2"),
    (3, {"context_parallel_size": 2}, {},
     "world size 3 is not divisible by parallel.tensor_model_parallel_size (1) x "
     "parallel.pipeline_model_parallel_size (1) x parallel.context_parallel_size (2)"),
    (4, {"context_parallel_size": 2, "tensor_model_parallel_size": 2,
         "sequence_parallel": True}, {"model.seq_length": 34},
     "each context-parallel shard (34 / 2 = 17 tokens) must be divisible by "
     "parallel.tensor_model_parallel_size=2"),
    (2, {"context_parallel_size": 0}, {}, "parallel.context_parallel_size (0) must be >= 1"),
])
def test_bad_context_parallel_layouts_name_the_field(tmp_path, world_size, parallel, changes,
                                                     message):
    """What every rank checks before any process group starts (check_run_config)."""
    from megatron_transmamba.training.pretrain import check_run_config
    cfg = run_config(tmp_path, **parallel)
    for key, value in changes.items():
        section, field = key.split(".")
        if section == "model":
            cfg.model[field] = value
        else:
            setattr(getattr(cfg, section), field, value)
    with pytest.raises(ValueError) as error:
        check_run_config(cfg, world_size)
    assert message in str(error.value)
