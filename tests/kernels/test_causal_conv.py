"""Fused causal depthwise conv + SiLU (Triton, CPU interpreter) against its float64 reference.

The backward runs at its default tiling and at small tiles (several row tiles per program,
several programs per row and channel blocks that do not divide C), with its x row shifts as
register gathers or as shifted loads. New buffers in the kernel module are filled with NaN, so
a skipped write fails.
"""

import pytest
import torch

pytest.importorskip("triton")

from helpers import assert_close, nan_filled_buffers  # noqa: E402
from transmamba_kernels.conv import causal_conv as conv_module  # noqa: E402
from transmamba_kernels.conv.causal_conv import causal_conv1d_silu_triton  # noqa: E402
from transmamba_kernels.conv.naive import causal_conv1d_silu_naive  # noqa: E402

BWD_TILINGS = {
    "default": dict(conv_module._BWD),
    "small": dict(block_t=16, block_c=16, tiles_per_program=2, num_warps=4, gather_x=True),
    "small-loads": dict(block_t=16, block_c=16, tiles_per_program=2, num_warps=4, gather_x=False),
}


@pytest.fixture(autouse=True)
def nan_filled(monkeypatch):
    """New buffers of the kernel module are NaN-filled (helpers.nan_filled_buffers)."""
    nan_filled_buffers(monkeypatch, conv_module)


@pytest.fixture(params=list(BWD_TILINGS))
def bwd_tiling(request, monkeypatch):
    monkeypatch.setattr(conv_module, "_BWD", BWD_TILINGS[request.param])
    return request.param


@pytest.mark.parametrize("T,C,W", [(1, 8, 4), (3, 8, 4), (37, 70, 4), (64, 16, 2), (5, 3, 4),
                                   (23, 20, 3)])
@pytest.mark.parametrize("dtype,ratio", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_forward_backward_match_reference(T, C, W, dtype, ratio, bwd_tiling):
    """T < W, T not a multiple of a tile's rows, C not a multiple of the channel block, odd W."""
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(2, T, C + 5, generator=g).to(dtype).requires_grad_(True)
    x = wide[..., 2:2 + C]                        # a strided view, as the mixer passes it
    weight = torch.randn(C, 1, W, generator=g).mul(0.5).requires_grad_(True)
    bias = torch.randn(C, generator=g).mul(0.1).requires_grad_(True)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (x, weight, bias)]
    out = causal_conv1d_silu_triton(x, weight, bias)
    ref = causal_conv1d_silu_naive(*ref_leaves)
    assert out.dtype == dtype
    assert_close("out", ref, out.double(), ratio)
    dout = torch.randn(out.shape, generator=g)
    (out.float() * dout).sum().backward()
    (ref * dout.double()).sum().backward()
    grads = (wide.grad[..., 2:2 + C], weight.grad, bias.grad)
    for name, a, b in zip(("dx", "dweight", "dbias"), grads, ref_leaves):
        assert_close(name, b.grad, a.double(), ratio * 2)
    assert wide.grad[..., :2].abs().max() == 0 and wide.grad[..., 2 + C:].abs().max() == 0


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
def test_seq_idx_forward_backward_match_reference(dtype, ratio, bwd_tiling):
    """Two rows with documents of 1, 2, 3, 11, 31 and 40 tokens (boundaries inside and at the
    edges of the forward's 32-token blocks and of the backward's tiles) against the float64
    reference, forward and backward."""
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
