"""Fused SwiGLU (Triton, CPU interpreter) against its float64 reference; launches and compile.

New buffers in the kernel module are filled with NaN, so a skipped write fails.
"""

import pytest
import torch

pytest.importorskip("triton")

from helpers import assert_close, nan_filled_buffers  # noqa: E402
from launches import assert_compiled_matches_eager, forward_backward_launches  # noqa: E402
from transmamba_kernels.swiglu import swiglu as swiglu_module  # noqa: E402
from transmamba_kernels.swiglu.naive import swiglu_naive  # noqa: E402
from transmamba_kernels.swiglu.swiglu import swiglu_triton  # noqa: E402


@pytest.fixture(autouse=True)
def nan_filled(monkeypatch):
    nan_filled_buffers(monkeypatch, swiglu_module)


@pytest.fixture
def real_buffers(monkeypatch):
    """Plain torch.empty (the NaN fill would count as a launch)."""
    monkeypatch.setattr(swiglu_module, "torch", torch)


@pytest.mark.parametrize("shape", [(1, 2), (3, 5, 74), (7, 2, 300), (130,)])
@pytest.mark.parametrize("dtype,ratio", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_forward_backward_match_reference(shape, dtype, ratio):
    """Odd F (37, 150), one row, rows not a multiple of the row block, F past one column block."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)
    ref_x = x.detach().double().requires_grad_(True)
    out, ref = swiglu_triton(x), swiglu_naive(ref_x)
    assert out.dtype == dtype and out.shape == (*shape[:-1], shape[-1] // 2)
    assert_close("out", ref, out.double(), ratio)
    dout = torch.randn(out.shape, generator=g)
    (out.float() * dout).sum().backward()
    (ref * dout.double()).sum().backward()
    assert_close("dx", ref_x.grad, x.grad.double(), ratio)


def test_naive_is_megatron_order():
    x = torch.randn(4, 10, dtype=torch.float64)
    x1, x2 = torch.chunk(x, 2, dim=-1)
    torch.testing.assert_close(swiglu_naive(x), torch.nn.functional.silu(x1) * x2, rtol=0, atol=0)


def test_strided_rows_are_bitwise_the_contiguous_result():
    """Rows with a stride other than 2F (a column slice, read in place) and a transposed [S, B]
    leading layout (copied) give the contiguous input's bits, forward and backward."""
    g = torch.Generator().manual_seed(1)
    for view_of in (lambda w: w[..., 3:37], lambda w: w.transpose(0, 1)[..., :34]):
        wide = torch.randn(3, 9, 40, generator=g).requires_grad_(True)
        view = view_of(wide)
        leaf = view.detach().contiguous().requires_grad_(True)
        out, ref = swiglu_triton(view), swiglu_triton(leaf)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        dout = torch.randn(out.shape, generator=g)
        (out * dout).sum().backward()
        (ref * dout).sum().backward()
        torch.testing.assert_close(view_of(wide.grad), leaf.grad, rtol=0, atol=0)


def test_launches(real_buffers):
    x = torch.randn(5, 3, 2 * 21, requires_grad=True)
    forward, backward = forward_backward_launches(swiglu_triton, [x], torch.randn(5, 3, 21))
    assert (forward.total, backward.total) == (1, 1), (forward.aten, forward.triton,
                                                       backward.aten, backward.triton)


def test_compile_fullgraph_matches_eager(real_buffers):
    x = torch.randn(4, 3, 2 * 19, requires_grad=True)
    assert_compiled_matches_eager(lambda x: swiglu_triton(x[:, 1:]) * 2, [x])
