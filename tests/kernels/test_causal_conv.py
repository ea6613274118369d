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


def _documents(lengths):
    """seq_idx [1, T] of documents with these lengths."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]


def test_naive_seq_idx_convolves_each_document_alone():
    """The reference's packed form is its unpacked form run on each document, in float64."""
    g = torch.Generator().manual_seed(1)
    lengths = [5, 1, 2, 9]
    x = torch.randn(1, sum(lengths), 6, generator=g, dtype=torch.float64)
    weight = torch.randn(6, 1, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    packed = causal_conv1d_silu_naive(x, weight, bias, _documents(lengths))
    alone = torch.cat([causal_conv1d_silu_naive(part, weight, bias)
                       for part in x.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype,ratio", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_seq_idx_forward_backward_match_reference(dtype, ratio):
    """Two rows with documents of 1, 2, 3 and 40 tokens (a boundary inside and at the edge
    of a 32-token block) against the float64 reference, forward and backward."""
    g = torch.Generator().manual_seed(2)
    T, C, W = 45, 70, 4
    seq_idx = torch.cat([_documents([1, 2, 40, 2]), _documents([3, 31, 11]) + 4])
    x = torch.randn(2, T, C + 3, generator=g).to(dtype)[..., 1:1 + C]
    weight = torch.randn(C, 1, W, generator=g) * 0.5
    bias = torch.randn(C, generator=g) * 0.1
    leaves = [x.detach().clone().requires_grad_(True), weight.clone().requires_grad_(True),
              bias.clone().requires_grad_(True)]
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (x, weight, bias)]
    out = causal_conv1d_silu_triton(*leaves, seq_idx=seq_idx)
    ref = causal_conv1d_silu_naive(*ref_leaves, seq_idx=seq_idx)
    assert not torch.allclose(ref, causal_conv1d_silu_naive(*ref_leaves), atol=1e-3)
    assert_close("out", ref, out.double(), ratio)
    dout = torch.randn(out.shape, generator=g)
    (out.float() * dout).sum().backward()
    (ref * dout.double()).sum().backward()
    for name, a, b in zip(("dx", "dweight", "dbias"), leaves, ref_leaves):
        assert_close(name, b.grad, a.grad.double(), ratio * 2)
