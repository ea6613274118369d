"""Tensor and sequence parallelism of the whole TransMamba LM against the TP = 1 run (gloo, CPU).

The model mixes T (TransPoints 0, 13 mid-chunk and T = 24), M, * and - layers. Each launch
(tensor_parallel_worker.py) runs the TP = 1 reference and then its layouts in turn; every
layout must give the TP = 1 weights at init (gathered and mapped back: in_proj rows per rank
are [z_r | x_r | B_r | C_r | dt_r]), logits, every parameter's gradient and the losses of 5
optimizer steps. Tolerances (float32, measured errors about 10x below them): logits 1e-5 max
abs, gradients 1e-5 of each tensor's largest entry, losses and grad norms 1e-5; after 5 Adam
steps the weights agree to 1e-3 of each tensor's largest entry, because Adam's per-entry
normalisation turns rounding in near-zero gradients into full-size steps.
"""

from pathlib import Path

import pytest
import torch

import torchrun_batch

WORKER = Path(__file__).with_name("tensor_parallel_worker.py")
LOGITS_TOL = GRAD_TOL = LOSS_TOL = 1e-5
TRAINED_TOL = 1e-3

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="runs the gloo/CPU path (megatron_adapter's CPU patches)"
)


WORLD2 = torchrun_batch.job(2, WORKER, "world2", "{out}")
WORLD4 = torchrun_batch.job(4, WORKER, "world4", "{out}")
TRAINER = torchrun_batch.job(2, WORKER, "trainer", "{out}")


@pytest.fixture(scope="module")
def world2(torchrun_jobs):
    return torchrun_jobs(WORLD2).ranks()


@pytest.fixture(scope="module")
def world4(torchrun_jobs):
    return torchrun_jobs(WORLD4).ranks()


def assert_matches_tp1(case: dict, where: str) -> None:
    assert case["parameters"] == case["reference_parameters"], where
    assert case["weights_max_abs"] == 0.0, f"{where}: initial weights depend on the TP size"
    assert case["logits_max_abs"] <= LOGITS_TOL, f"{where}: logits {case['logits_max_abs']:.2e}"
    bad = {k: v for k, v in case["grads_relative"].items() if not v <= GRAD_TOL}
    assert not bad, f"{where}: gradients off by more than {GRAD_TOL} of their max: {bad}"
    # replicated tensors (norm weights) must agree on every TP rank, SP included
    assert case["grad_replica_gap"] == 0.0 and case["weight_replica_gap"] == 0.0, where
    assert case["losses"] == pytest.approx(case["reference_losses"], abs=LOSS_TOL), where
    assert case["grad_norms"] == pytest.approx(case["reference_grad_norms"], rel=LOSS_TOL), where
    assert case["grad_norms"][0] > 1.0, "clip_grad=1.0 was not exercised"
    bad = {k: v for k, v in case["trained_relative"].items() if not v <= TRAINED_TOL}
    assert not bad, f"{where}: weights after 5 steps: {bad}"


def expected_layout(tp: int, dp: int, sp: bool) -> dict:
    # H = 8, G = 4, P = N = 8, d = 32: in_proj rows 2HP + 2GN + H = 200; vocab 64; FFN 64 (x2 GLU)
    return {"tp": tp, "dp": dp, "sp": sp, "mixer_heads": 8 // tp, "mixer_groups": 4 // tp,
            "in_proj_shape": [200 // tp, 32], "embedding_shape": [64 // tp, 32],
            "fc1_shape": [128 // tp, 32], "embedding_scatters_sequence": sp,
            "residual_shape": [24 // tp if sp else 24, 2, 32]}


@pytest.mark.parametrize("case, tp, sp", [("tp2", 2, False), ("tp2_sp", 2, True)])
def test_world2_matches_tp1(world2, case, tp, sp):
    for rank, results in enumerate(world2):
        assert results["reference_layout"] == expected_layout(1, 2, False)
        assert results[case]["layout"] == expected_layout(tp, 1, sp)
        assert_matches_tp1(results[case], f"rank {rank} {case}")


@pytest.mark.parametrize("case, tp, dp, sp", [("tp4", 4, 1, False), ("tp2_dp2_sp", 2, 2, True)])
def test_world4_matches_tp1(world4, case, tp, dp, sp):
    for rank, results in enumerate(world4):
        assert results["reference_layout"] == expected_layout(1, 4, False)
        assert results[case]["layout"] == expected_layout(tp, dp, sp)
        assert_matches_tp1(results[case], f"rank {rank} {case}")


def test_dist_checkpoint_saved_at_tp2_loads_at_tp1(world2):
    """sharded_state_dict: in_proj stored as z, x, B, C, dt and conv1d as x, B, C at full size;
    a TP = 2 checkpoint loads into a TP = 1 model as exactly the gathered TP = 2 weights."""
    H, P, G, N, d, W = 8, 8, 4, 8, 32, 4
    for results in world2:
        assert results["tp2"]["sharded_in_proj_keys"] == [
            f"layers.0.mixer.in_proj.weight.{c}" for c in ("B", "C", "dt", "x", "z")]
        loaded = results["dist_checkpoint_tp2_to_tp1"]
        assert loaded["max_abs_before_load"] > 0.1       # the TP = 1 model started elsewhere
        assert loaded["max_abs_after_load"] and set(loaded["max_abs_after_load"].values()) == {0.0}
        shapes = loaded["global_shapes"]
        prefix = "layers.0.mixer."
        assert shapes[prefix + "in_proj.weight.z"] == [H * P, d]
        assert shapes[prefix + "in_proj.weight.B"] == [G * N, d]
        assert shapes[prefix + "in_proj.weight.dt"] == [H, d]
        assert shapes[prefix + "conv1d.weight.C"] == [G * N, 1, W]
        assert shapes[prefix + "conv1d.bias.x"] == [H * P]
        assert shapes[prefix + "A_log"] == [H] and shapes[prefix + "norm_weight"] == [H * P]
        assert shapes[prefix + "out_proj.weight"] == [d, H * P]
        assert prefix + "in_proj.weight" not in shapes


def test_vocab_not_divisible_fails_on_every_rank(world2):
    for results in world2:
        assert "vocab_size=63 must be divisible by parallel.tensor_model_parallel_size=2" \
            in results["bad_vocab_error"]


def test_trainer_tp2_matches_tp1_and_resumes_exactly(torchrun_jobs):
    """pretrain() on the embedded corpus: TP = 2 (2 micro-batches) against TP = 1 x DP = 2 on
    the same global batch, and a TP = 2 run stopped at step 3 and resumed from its checkpoint."""
    for result in torchrun_jobs(TRAINER).ranks():
        tp1, tp2 = result["tp1"], result["tp2"]
        assert sorted(tp1) == sorted(tp2) == [str(s) for s in range(1, 7)]
        assert [tp2[s] for s in sorted(tp2)] == pytest.approx([tp1[s] for s in sorted(tp1)],
                                                               abs=LOSS_TOL)
        assert result["tp1_parameters"] == result["tp2_parameters"]     # global count at TP = 2
        assert {".metadata", "checkpoint.json", "common.pt"} <= set(result["checkpoint_files"])
        assert sorted(result["tp2_stopped"]) == ["1", "2", "3"]
        assert sorted(result["tp2_resumed"]) == ["4", "5", "6"]
        for step, loss in {**result["tp2_stopped"], **result["tp2_resumed"]}.items():
            assert loss == tp2[step], f"step {step}: resumed run differs from the uninterrupted one"


def test_heads_not_divisible_fail_before_any_process_group(tmp_path):
    """The trainer's entry point with mamba_num_heads=3 at TP = 2: what every rank reports
    before any process group exists (the launch that shows it: test_data_parallel.py)."""
    from megatron_transmamba.training.config import load_run_config
    from megatron_transmamba.training.pretrain import check_run_config

    cfg = load_run_config("examples/configs/tiny_cpu.yaml", [
        "--parallel.tensor_model_parallel_size=2", "--model.mamba_num_heads=3",
        "--model.mamba_num_groups=1", f"--data.cache_dir={tmp_path}"])
    with pytest.raises(ValueError) as error:
        check_run_config(cfg, 2)
    assert "mamba_num_heads=3 must be divisible by tensor_model_parallel_size=2" \
        in str(error.value)
