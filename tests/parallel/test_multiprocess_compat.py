"""megatron-core on 2 CPU processes (gloo) under torchrun, against unsharded references.

The worker (multiprocess_compat_worker.py) runs every layout in one launch, re-initializing
between them; ``--standalone`` makes torchrun pick a free rendezvous port.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("multiprocess_compat_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 120
TOLERANCE = 1e-4  # float32 against float64 (or float32) references, values of order 1-10

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="runs the gloo/CPU path (megatron_adapter's CPU patches)"
)


def torchrun(scenario: str, out_dir: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(WORKER), scenario, str(out_dir),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )


def _tail(result: subprocess.CompletedProcess) -> str:
    return (result.stdout + result.stderr)[-6000:]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("layouts")
    result = torchrun("layouts", out_dir)
    assert result.returncode == 0, _tail(result)
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


def _assert_small(errors: dict, where: str) -> None:
    bad = {name: error for name, error in errors.items() if not error <= TOLERANCE}
    assert not bad, f"{where}: max abs errors above {TOLERANCE}: {bad}"


@pytest.mark.parametrize("case", ["tp2_cpu_init", "tp2_rng_tracker_init", "tp2_sequence_parallel"])
def test_tp2_column_row_matches_unsharded(layouts, case):
    for rank, results in enumerate(layouts):
        assert results["tp2_info"] == {"tp": 2, "dp": 1}
        # ColumnParallelLinear(8 -> 12) keeps 6 output rows, RowParallelLinear(12 -> 6)
        # keeps 6 input columns: the weights really were split.
        assert results[case]["column_weight_shape"] == [6, 8]
        assert results[case]["row_weight_shape"] == [6, 6]
        _assert_small(results[case]["max_abs_error"], f"rank {rank} {case}")


def test_tp2_vocab_parallel_embedding_and_cross_entropy(layouts):
    for rank, results in enumerate(layouts):
        case = results["tp2_embedding_cross_entropy"]
        assert case["embedding_weight_shape"] == [5, 4]  # vocab 10 split in two
        _assert_small(case["max_abs_error"], f"rank {rank} embedding / cross entropy")


def test_dp2_distributed_optimizer_matches_adamw(layouts):
    for rank, results in enumerate(layouts):
        case = results["dp2_distributed_optimizer"]
        assert case["data_parallel_size"] == 2
        assert case["optimizer_is_distributed"]
        # Each rank's Adam holds only its shard of the parameters.
        assert 0 < case["optimizer_state_numel"] < case["model_numel"]
        megatron_norms, reference_norms = case["grad_norms"][0::2], case["grad_norms"][1::2]
        assert megatron_norms == pytest.approx(reference_norms, rel=1e-5)
        assert all(norm > 0.5 for norm in megatron_norms), "clip_grad=0.5 was not exercised"
        _assert_small(case["max_abs_error"], f"rank {rank} distributed optimizer")
    total_state = sum(r["dp2_distributed_optimizer"]["optimizer_state_numel"] for r in layouts)
    assert total_state == layouts[0]["dp2_distributed_optimizer"]["model_numel"]


@pytest.mark.parametrize(
    "case, schedule, stages",
    [
        ("pp2", "forward_backward_pipelining_without_interleaving", [[0], [1]]),
        ("pp2_interleaved", "forward_backward_pipelining_with_interleaving", [[0, 2], [1, 3]]),
    ],
)
def test_pp2_schedules_match_unpipelined(layouts, case, schedule, stages):
    assert sorted(r[case]["pipeline_rank"] for r in layouts) == [0, 1]
    for results in layouts:
        result = results[case]
        pp_rank = result["pipeline_rank"]
        assert result["pipeline_size"] == 2
        assert result["forward_backward_func"] == schedule
        assert result["stages"] == stages[pp_rank]
        last_stage = pp_rank == 1  # holds the last global stage in both layouts
        assert result["num_losses"] == (4 if last_stage else 0)
        assert ("losses" in result["max_abs_error"]) == last_stage
        _assert_small(result["max_abs_error"], f"pipeline rank {pp_rank} {case}")


def test_no_cuda_was_touched(layouts):
    for results in layouts:
        assert results["cuda_initialized"] is False
        assert results["cuda_lazy_init_calls"] == 0
        assert results["new_cuda_queued_calls"] == 0


def test_bad_layout_fails_fast_on_every_rank(layouts):
    """tensor_model_parallel_size=3 on 2 processes, after the layouts: every rank raises
    before any process group starts (so no rank waits for the others)."""
    for results in layouts:
        bad = results["bad_layout"]
        assert bad["error"] is not None and not bad["process_group"]
        assert bad["seconds"] < LAUNCH_TIMEOUT_S / 2, f"took {bad['seconds']:.0f} s"
        assert "world size 2" in bad["error"]
        assert "parallel.tensor_model_parallel_size (3)" in bad["error"]
        assert "parallel.pipeline_model_parallel_size (1)" in bad["error"]
