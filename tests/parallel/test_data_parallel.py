"""Data parallelism of the trainer against one process (gloo, CPU, float32).

One process trains the tiny model of ``data_parallel_common.py`` for 5 steps of global batch 8
(4 micro-batches of 2). The same run at DP = 2 (2 micro-batches per rank, gradient
accumulation) must repeat its losses: with megatron-core's distributed optimizer and
overlapped gradient reduction, and with the replicated optimizer and a plain all-reduce. A
DP = 2 run stopped at step 3 and resumed from its checkpoint (distributed-optimizer
state included) must repeat the uninterrupted run exactly. TP = 2 x DP = 2 (4 processes) must
repeat them too, and so must TP = 2 x PP = 2. Two torchrun agents with
``--nnodes=2`` and a localhost c10d rendezvous stand for two nodes. Tolerance: 1e-5 absolute
on the losses (measured about 5e-7: the DP all-reduce sums the gradients in another order).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import torchrun_batch  # noqa: E402
from data_parallel_common import TRAIN_ITERS  # noqa: E402
from megatron_transmamba.parallel.initialize import find_free_port  # noqa: E402

WORKER = Path(__file__).with_name("data_parallel_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 420   # the 2-core machine is shared; unloaded, a launch takes 15-40 s
LOSS_TOL = 1e-5

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="runs the gloo/CPU path (megatron_adapter's CPU patches)"
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def torchrun(args: list, nproc: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *map(str, args)]
    return subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)


def read_ranks(out_dir: Path, nproc: int) -> list:
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(nproc)]


@pytest.fixture(scope="module")
def reference(one_process_run):
    """The single-process run (in this process: no torchrun, one rank; golden.py)."""
    run = one_process_run("data_parallel")
    assert run["layout"]["world_size"] == 1 and run["layout"]["num_microbatches"] == 4
    assert len(run["losses"]) == TRAIN_ITERS
    return run["losses"]


def losses(run: dict) -> list:
    return [run[str(step)] for step in sorted(map(int, run))]


DP2_LAYOUT = {"world_size": 2, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
              "data_parallel_size": 2, "context_parallel_size": 1, "num_microbatches": 2,
              "optimizer": ["DistributedOptimizer"], "overlap_grad_reduce": True,
              "virtual_pipeline_model_parallel_size": None, "recompute": "none",
              "compile": False, "cuda_graphs": False, "sequence_parallel": False,
              "use_distributed_optimizer": True, "stage_layers": [[0, 10]],
              "rank_layers": [list(range(10))], "layer_numbers": [list(range(1, 11))]}


DP2 = torchrun_batch.job(2, WORKER, "dp2", "{out}")
WORLD4 = torchrun_batch.job(4, WORKER, "world4", "{out}")


def test_dp2_matches_single_process_and_resumes_exactly(reference, torchrun_jobs):
    run = torchrun_jobs(DP2)
    assert "layout TP=1 x PP=1 x DP=2 = 2 ranks" in run.stdout
    assert "optimizer" in run.stdout and "sharded" in run.stdout
    for rank, runs in enumerate(run.ranks()):
        assert runs["layout"] == DP2_LAYOUT, rank
        for name in ("distributed_optimizer", "plain"):
            assert losses(runs[name]) == pytest.approx(reference, abs=LOSS_TOL), (rank, name)
        assert {".metadata", "checkpoint.json", "common.pt"} <= set(runs["checkpoint_files"])
        full = runs["distributed_optimizer"]
        assert sorted(runs["stopped"]) == ["1", "2", "3"]
        assert sorted(runs["resumed"]) == ["4", "5"]
        for step, loss in {**runs["stopped"], **runs["resumed"]}.items():
            assert loss == full[step], f"rank {rank} step {step}: resume is not exact"


def test_tp2_x_dp2_tp2_x_pp2_and_pp2_x_dp2_match_single_process(reference, torchrun_jobs):
    run = torchrun_jobs(WORLD4)
    assert "layout TP=2 x PP=1 x DP=2 = 4 ranks" in run.stdout
    assert "layout TP=2 x PP=2 x DP=1 = 4 ranks" in run.stdout
    assert "layout TP=1 x PP=2 x DP=2 = 4 ranks" in run.stdout
    for rank, runs in enumerate(run.ranks()):
        assert runs["tp2_dp2"]["layout"] == {**DP2_LAYOUT, "world_size": 4,
                                             "tensor_model_parallel_size": 2}
        assert losses(runs["tp2_dp2"]["losses"]) == pytest.approx(reference, abs=LOSS_TOL)
        layout = runs["tp2_pp2"]["layout"]
        assert (layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"],
                layout["data_parallel_size"], layout["num_microbatches"]) == (2, 2, 1, 4)
        assert layout["rank_layers"] == [[0, 1, 2, 3, 4] if rank < 2 else [5, 6, 7, 8, 9]]
        assert losses(runs["tp2_pp2"]["losses"]) == pytest.approx(reference, abs=LOSS_TOL)
        layout = runs["pp2_dp2"]["layout"]       # with selective recomputation
        assert (layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"],
                layout["data_parallel_size"], layout["num_microbatches"]) == (1, 2, 2, 2)
        assert layout["rank_layers"] == [[0, 1, 2, 3, 4] if rank < 2 else [5, 6, 7, 8, 9]]
        assert layout["recompute"] == "selective (core_attn, mlp)"
        assert losses(runs["pp2_dp2"]["losses"]) == pytest.approx(reference, abs=LOSS_TOL)


def test_two_nodes_match_single_process(reference, tmp_path):
    """Two torchrun agents (--nnodes=2, one process each) meet at a localhost c10d rendezvous,
    as on two machines, and train at DP = 2."""
    port = find_free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "--rdzv_id=two_nodes", str(WORKER), "nodes", str(tmp_path)]
    agents = [subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outputs = [agent.communicate(timeout=LAUNCH_TIMEOUT_S)[0] for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    for agent, output in zip(agents, outputs):
        assert agent.returncode == 0, output[-6000:]
    for runs in read_ranks(tmp_path, 2):
        assert runs["layout"] == DP2_LAYOUT
        assert losses(runs["distributed_optimizer"]) == pytest.approx(reference, abs=LOSS_TOL)


def test_bad_layout_fails_fast_on_every_rank(tmp_path):
    """The one launch of examples/pretrain.py with a bad layout: every rank reports the error
    once, before any process group. The other layout errors (global batch, pipeline splits,
    heads at TP = 2) come from the same check_run_config and are tested in one process
    (test_pipeline_parallel.py, test_tensor_parallel.py, test_run_config.py)."""
    message = "world size 2 is not divisible by parallel.tensor_model_parallel_size (4)"
    start = time.monotonic()
    result = torchrun(["examples/pretrain.py", "--config", "examples/configs/tiny_cpu.yaml",
                       "--parallel.tensor_model_parallel_size=4",
                       f"--data.cache_dir={tmp_path}"], 2)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < LAUNCH_TIMEOUT_S / 3, f"took {elapsed:.0f} s"
    for rank in range(2):
        assert f"error (rank {rank}): {message}" in result.stderr, result.stderr[-3000:]
    assert result.stderr.count(message) == 2, result.stderr[-3000:]
