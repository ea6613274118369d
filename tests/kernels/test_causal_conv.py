"""Fused causal depthwise conv + SiLU (Triton, CPU interpreter) against its float64 reference."""

import pytest
import torch

pytest.importorskip("triton")

from helpers import assert_close  # noqa: E402
from transmamba_kernels.conv.causal_conv import causal_conv1d_silu_triton  # noqa: E402
from transmamba_kernels.conv.naive import causal_conv1d_silu_naive  # noqa: E402


@pytest.mark.parametrize("T,C,W", [(1, 8, 4), (37, 70, 4), (64, 16, 2), (5, 3, 4)])
@pytest.mark.parametrize("dtype,ratio", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_forward_backward_match_reference(T, C, W, dtype, ratio):
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(2, T, C + 5, generator=g).to(dtype)
    x = wide[..., 2:2 + C]                        # a strided view, as the mixer passes it
    weight = torch.randn(C, 1, W, generator=g) * 0.5
    bias = torch.randn(C, generator=g) * 0.1
    leaves = [x.detach().clone().requires_grad_(True), weight.clone().requires_grad_(True),
              bias.clone().requires_grad_(True)]
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (x, weight, bias)]
    out = causal_conv1d_silu_triton(leaves[0][..., :], leaves[1], leaves[2])
    ref = causal_conv1d_silu_naive(*ref_leaves)
    assert out.dtype == dtype
    assert_close("out", ref, out.double(), ratio)
    dout = torch.randn(out.shape, generator=g)
    (out.float() * dout).sum().backward()
    (ref * dout.double()).sum().backward()
    for name, a, b in zip(("dx", "dweight", "dbias"), leaves, ref_leaves):
        assert_close(name, b.grad, a.grad.double(), ratio * 2)


def test_strided_input_is_read_in_place():
    x = torch.randn(1, 9, 12)[..., 3:11]
    w, b = torch.randn(8, 1, 4), torch.randn(8)
    torch.testing.assert_close(causal_conv1d_silu_triton(x, w, b), causal_conv1d_silu_naive(x, w, b),
                               rtol=1e-5, atol=1e-6)
