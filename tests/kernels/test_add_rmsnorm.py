"""Fused RMSNorm and residual-add + RMSNorm (Triton, CPU interpreter) against their float64
references; launch budgets, determinism and torch.compile.

New buffers in the kernel module are filled with NaN, so a skipped write fails.
"""

import pytest
import torch

pytest.importorskip("triton")

from helpers import assert_close, nan_filled_buffers  # noqa: E402
from launches import assert_compiled_matches_eager, forward_backward_launches  # noqa: E402
from transmamba_kernels.norm import rmsnorm as rmsnorm_module  # noqa: E402
from transmamba_kernels.norm.naive import add_rmsnorm_naive, rmsnorm_naive  # noqa: E402
from transmamba_kernels.norm.rmsnorm import add_rmsnorm_triton, rmsnorm_triton  # noqa: E402


@pytest.fixture(autouse=True)
def nan_filled(monkeypatch):
    nan_filled_buffers(monkeypatch, rmsnorm_module)


@pytest.fixture
def real_buffers(monkeypatch):
    """Plain torch.empty (the NaN fill would count as a launch)."""
    monkeypatch.setattr(rmsnorm_module, "torch", torch)


@pytest.mark.parametrize("shape", [(5, 3, 24), (1, 1, 40), (33, 2, 96), (100, 37)])
@pytest.mark.parametrize("x_dtype,res_dtype,ratio", [(torch.float32, torch.float32, 1e-6),
                                                     (torch.float16, torch.float16, 2e-3),
                                                     (torch.float16, torch.float32, 2e-3)])
def test_add_rmsnorm_matches_float64(shape, x_dtype, res_dtype, ratio):
    """[S, B, d] and [rows, d] layouts, d not a power of two; residual kept in float32 while
    x is fp16 (megatron's fp32 residual connection)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(x_dtype).requires_grad_(True)
    res = torch.randn(*shape, generator=g).to(res_dtype).requires_grad_(True)
    w = (torch.rand(shape[-1], generator=g) + 0.5).requires_grad_(True)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (x, res, w)]
    normed, summed = add_rmsnorm_triton(x, res, w, 1e-5)
    ref_normed, ref_summed = add_rmsnorm_naive(*ref_leaves, 1e-5)
    assert normed.dtype == x_dtype and summed.dtype == res_dtype
    # the sum is rounded to the residual's dtype, exactly as the reference in that dtype
    torch.testing.assert_close(summed, add_rmsnorm_naive(x.detach(), res.detach(), w, 1e-5)[1],
                               rtol=0, atol=0)
    assert_close("normed", ref_normed, normed.double(), ratio)
    assert_close("summed", ref_summed, summed.double(), ratio)
    d_normed, d_summed = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    (normed.float() * d_normed + summed.float() * d_summed).sum().backward()
    (ref_normed * d_normed.double() + ref_summed * d_summed.double()).sum().backward()
    for name, a, b in zip(("dx", "dresidual", "dweight"), (x, res, w), ref_leaves):
        assert a.grad.dtype == a.dtype, name
        assert_close(name, b.grad, a.grad.double(), ratio * 2)


def test_without_residual_is_rmsnorm():
    x, w = torch.randn(4, 3, 16), torch.rand(16) + 0.5
    normed, summed = add_rmsnorm_triton(x, None, w, 1e-5)
    assert summed is x
    torch.testing.assert_close(normed, rmsnorm_triton(x, w, 1e-5), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(5, 3, 24), (1, 1, 40), (33, 2, 96)])
@pytest.mark.parametrize("dtype,ratio", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_rmsnorm_matches_float64(shape, dtype, ratio):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype).requires_grad_(True)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (x, w)]
    out, ref = rmsnorm_triton(x, w, 1e-5), rmsnorm_naive(*ref_leaves, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close("out", ref, out.double(), ratio)
    dout = torch.randn(shape, generator=g)
    (out.float() * dout).sum().backward()
    (ref * dout.double()).sum().backward()
    assert w.grad.dtype == dtype                  # the weight's gradient in its own dtype
    assert_close("dx", ref_leaves[0].grad, x.grad.double(), ratio * 2)
    assert_close("dw", ref_leaves[1].grad, w.grad.double(), ratio * 2)


def test_weight_gradient_over_many_partials_is_deterministic(monkeypatch):
    """Programs of 4 rows: 53 partials, which the sum kernel reads in 4 blocks of 16; two
    backwards give the same bits."""
    monkeypatch.setattr(rmsnorm_module, "_ROWS_BWD", 4)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(211, 24, generator=g, requires_grad=True)
    res = torch.randn(211, 24, generator=g, requires_grad=True)
    w = (torch.rand(24, generator=g) + 0.5).requires_grad_(True)
    dn, ds = torch.randn(211, 24, generator=g), torch.randn(211, 24, generator=g)
    grads = [torch.autograd.grad(add_rmsnorm_triton(x, res, w, 1e-5), (x, res, w), (dn, ds))
             for _ in range(2)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ref = [t.detach().double().requires_grad_(True) for t in (x, res, w)]
    ref_grads = torch.autograd.grad(add_rmsnorm_naive(*ref, 1e-5), ref, (dn.double(), ds.double()))
    for name, a, b in zip(("dx", "dresidual", "dweight"), grads[0], ref_grads):
        assert_close(name, b, a.double(), 2e-6)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_launches(real_buffers, weight_dtype):
    """rmsnorm and add_rmsnorm: forward 1 launch, backward 2 (bf16 weight: no cast launches)."""
    x = torch.randn(7, 2, 48, requires_grad=True)
    res = torch.randn(7, 2, 48, requires_grad=True)
    w = torch.ones(48, dtype=weight_dtype, requires_grad=True)
    forward, backward = forward_backward_launches(lambda x, w: rmsnorm_triton(x, w, 1e-5), [x, w],
                                                  torch.randn(7, 2, 48))
    assert (forward.total, backward.total) == (1, 2), (forward.aten, backward.aten)
    forward, backward = forward_backward_launches(
        lambda x, res, w: add_rmsnorm_triton(x, res, w, 1e-5), [x, res, w],
        (torch.randn(7, 2, 48), torch.randn(7, 2, 48)))
    assert (forward.total, backward.total) == (1, 2), (forward.aten, backward.aten)
    assert backward.triton == ["_add_rmsnorm_bwd_kernel", "_sum_partials_kernel"]


def test_compile_fullgraph_matches_eager(real_buffers):
    x, res = torch.randn(5, 2, 32, requires_grad=True), torch.randn(5, 2, 32, requires_grad=True)
    w = (torch.rand(32) + 0.5).requires_grad_(True)

    def block(x, res, w):
        normed, summed = add_rmsnorm_triton(x * 2, res, w, 1e-5)
        return rmsnorm_triton(normed + summed, w, 1e-5), summed

    assert_compiled_matches_eager(block, [x, res, w])
