"""Fused cross entropy (Triton, CPU interpreter) against its reference in float64, on the whole
vocabulary and on a vocabulary split over 2 real processes (gloo)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

pytest.importorskip("triton")

from helpers import assert_close, nan_filled_buffers  # noqa: E402
from launches import count_launches  # noqa: E402
from transmamba_kernels.cross_entropy import cross_entropy as ce_module  # noqa: E402
from transmamba_kernels.cross_entropy.cross_entropy import cross_entropy_triton  # noqa: E402
from transmamba_kernels.cross_entropy.naive import cross_entropy_naive  # noqa: E402


@pytest.fixture(autouse=True)
def nan_filled(monkeypatch):
    """New buffers of the kernel module are NaN-filled (helpers.nan_filled_buffers)."""
    nan_filled_buffers(monkeypatch, ce_module)


def make_inputs(N, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(N, V, generator=g)).to(dtype)
    target = torch.randint(0, V, (N,), generator=g)
    dloss = torch.randn(N, generator=g)
    return logits, target, dloss


def loss_and_grad(fn, logits, target, dloss, **kwargs):
    leaf = logits.detach().clone().requires_grad_(True)
    loss = fn(leaf, target, **kwargs)
    (grad,) = torch.autograd.grad(loss, leaf, dloss.to(loss.dtype))
    return loss, grad


def test_naive_is_torch_cross_entropy():
    logits, target, _ = make_inputs(9, 320, torch.float64)
    assert_close("loss", F.cross_entropy(logits, target, reduction="none"),
                 cross_entropy_naive(logits, target), 1e-14)


@pytest.mark.parametrize("N,V", [(1, 7), (5, 320), (13, 1000), (4, 256), (3, 1)])
@pytest.mark.parametrize("dtype,ratio", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_forward_backward_match_reference(N, V, dtype, ratio):
    logits, target, dloss = make_inputs(N, V, dtype)
    loss_ref, grad_ref = loss_and_grad(cross_entropy_naive, logits.double(), target, dloss)
    loss, grad = loss_and_grad(cross_entropy_triton, logits, target, dloss)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close("loss", loss_ref, loss, 1e-6)   # float32 math on the same input values
    assert_close("dlogits", grad_ref, grad, ratio)


@pytest.mark.parametrize("block_v", [16, 2048])
def test_other_vocabulary_blocks(monkeypatch, block_v):
    monkeypatch.setattr(ce_module, "_MAX_BLOCK_V", block_v)
    logits, target, dloss = make_inputs(6, 1000, torch.float32)
    loss_ref, grad_ref = loss_and_grad(cross_entropy_naive, logits.double(), target, dloss)
    loss, grad = loss_and_grad(cross_entropy_triton, logits, target, dloss)
    assert_close("loss", loss_ref, loss, 1e-6)
    assert_close("dlogits", grad_ref, grad, 1e-6)


def test_extreme_logits_stay_finite():
    logits, target, dloss = make_inputs(4, 320, torch.float16)
    logits[0] = -60000.0
    logits[1, 7] = 60000.0
    target[1] = 7
    loss_ref, grad_ref = loss_and_grad(cross_entropy_naive, logits.double(), target, dloss)
    loss, grad = loss_and_grad(cross_entropy_triton, logits, target, dloss)
    assert_close("loss", loss_ref, loss, 1e-6)
    assert_close("dlogits", grad_ref, grad, 2e-3)


def test_strided_rows_give_the_contiguous_result():
    logits, target, dloss = make_inputs(7, 320, torch.float16)
    wide = torch.randn(7, 400).to(torch.float16)
    wide[:, 50:370] = logits
    strided = wide[:, 50:370]
    assert not strided.is_contiguous()
    loss_s, grad_s = loss_and_grad(cross_entropy_triton, strided, target, dloss)
    loss_c, grad_c = loss_and_grad(cross_entropy_triton, logits, target, dloss)
    assert torch.equal(loss_s, loss_c) and torch.equal(grad_s, grad_c)
    # an expanded loss gradient (from .sum()) is read in place
    _, grad_ones = loss_and_grad(cross_entropy_triton, logits, target, torch.ones(7))
    leaf = logits.clone().requires_grad_(True)
    cross_entropy_triton(leaf, target).sum().backward()
    assert torch.equal(leaf.grad, grad_ones)


def test_one_launch_forward_one_backward(monkeypatch):
    monkeypatch.undo()   # the NaN fill of new buffers is a launch of the test's own
    logits, target, dloss = make_inputs(5, 320, torch.float16)
    leaf = logits.requires_grad_(True)
    with count_launches() as forward:
        loss = cross_entropy_triton(leaf, target)
    with count_launches() as backward:
        torch.autograd.grad(loss, leaf, dloss)
    assert (forward.aten, forward.triton) == ([], ["_cross_entropy_fwd_kernel"])
    assert (backward.aten, backward.triton) == ([], ["_cross_entropy_bwd_kernel"])


def test_deterministic():
    logits, target, dloss = make_inputs(9, 1000, torch.float16)
    first = loss_and_grad(cross_entropy_triton, logits, target, dloss)
    second = loss_and_grad(cross_entropy_triton, logits, target, dloss)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    logits, target, _ = make_inputs(6, 320, torch.float32)

    def step(logits, target):
        return cross_entropy_triton(logits * 2, target).mean()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaf = logits.clone().requires_grad_(True)
        loss = fn(leaf, target)
        loss.backward()
        results.append((loss, leaf.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


TP_CASES = [(6, 320, torch.float32, 1e-6), (5, 1000, torch.float16, 2e-3)]


def _tensor_parallel_worker(rank: int, world: int, init_file: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        for N, V, dtype, ratio in TP_CASES:
            logits, target, dloss = make_inputs(N, V, dtype)
            vocab_local = V // world
            own = slice(rank * vocab_local, (rank + 1) * vocab_local)
            # the targets fall in both ranks' slices
            assert {int(t) // vocab_local for t in target} == set(range(world))
            loss_ref, grad_ref = loss_and_grad(cross_entropy_naive, logits.double(), target, dloss)
            local = logits[:, own]
            assert local.shape == (N, vocab_local)
            loss_naive, grad_naive = loss_and_grad(cross_entropy_naive, local.double(), target,
                                                   dloss, tp_group=group)
            assert_close(f"rank {rank} naive loss", loss_ref, loss_naive, 1e-14)
            assert_close(f"rank {rank} naive dlogits", grad_ref[:, own], grad_naive, 1e-14)
            loss, grad = loss_and_grad(cross_entropy_triton, local, target, dloss, tp_group=group)
            assert grad.shape == (N, vocab_local) and grad.dtype == dtype
            assert_close(f"rank {rank} loss", loss_ref, loss, 1e-6)
            assert_close(f"rank {rank} dlogits", grad_ref[:, own], grad, ratio)
    finally:
        dist.destroy_process_group()


def test_vocab_split_over_two_processes_matches_one(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_tensor_parallel_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)
