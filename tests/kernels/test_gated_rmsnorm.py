"""Fused gated grouped RMSNorm (Triton, CPU interpreter) against its reference in float64."""

import pytest
import torch

pytest.importorskip("triton")

from helpers import assert_close  # noqa: E402
from transmamba_kernels.norm.gated_rmsnorm import gated_rmsnorm_triton  # noqa: E402
from transmamba_kernels.norm.naive import gated_rmsnorm_naive  # noqa: E402


@pytest.mark.parametrize("T,transpoint,groups,width", [(7, 0, 2, 24), (7, 3, 2, 24), (19, 19, 1, 16),
                                                        (19, 25, 4, 32), (1, 0, 3, 12)])
@pytest.mark.parametrize("dtype,ratio", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_forward_backward_match_reference(T, transpoint, groups, width, dtype, ratio):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, T, width, generator=g).to(dtype)
    z = torch.randn(2, T, width, generator=g).to(dtype)
    w = torch.rand(width, generator=g) + 0.5
    leaves = [t.clone().requires_grad_(True) for t in (y, z, w)]
    ref_leaves = [t.double().requires_grad_(True) for t in (y, z, w)]
    out = gated_rmsnorm_triton(*leaves[:2], leaves[2], groups, 1e-5, transpoint)
    ref = gated_rmsnorm_naive(*ref_leaves[:2], ref_leaves[2], groups, 1e-5, transpoint)
    assert out.dtype == dtype
    assert_close("out", ref, out.double(), ratio)
    dout = torch.randn(out.shape, generator=g)
    (out.float() * dout).sum().backward()
    (ref * dout.double()).sum().backward()
    for name, a, b in zip(("dy", "dz", "dw"), leaves, ref_leaves):
        if b.grad is None or b.grad.abs().max() == 0:
            assert a.grad.abs().max() == 0, name
        else:
            assert_close(name, b.grad, a.grad.double(), ratio * 2)


def test_bad_shapes():
    with pytest.raises(ValueError, match="weight must be"):
        gated_rmsnorm_triton(torch.randn(1, 2, 6), torch.randn(1, 2, 6), torch.ones(6), 4, 1e-5, 0)
