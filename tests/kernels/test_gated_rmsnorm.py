"""Fused gated grouped RMSNorm (Triton, CPU interpreter) against its reference in float64."""

import pytest
import torch

pytest.importorskip("triton")

from helpers import assert_close, nan_filled_buffers  # noqa: E402
from transmamba_kernels.norm import gated_rmsnorm as norm_module  # noqa: E402
from transmamba_kernels.norm.gated_rmsnorm import gated_rmsnorm_triton  # noqa: E402
from transmamba_kernels.norm.naive import gated_rmsnorm_naive  # noqa: E402


@pytest.fixture(autouse=True)
def nan_filled(monkeypatch):
    """New buffers of the kernel module are NaN-filled (helpers.nan_filled_buffers)."""
    nan_filled_buffers(monkeypatch, norm_module)


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


def _positions(lengths_per_row):
    """position_ids [B, T] of rows packed with documents of these lengths."""
    return torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in lengths_per_row])


@pytest.mark.parametrize("transpoint", [0, 1, 3, 40])
@pytest.mark.parametrize("dtype,ratio", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_position_ids_forward_backward_match_reference(transpoint, dtype, ratio):
    """Per-token positions (rows of 1 to 17 token documents; a 16-token program block spans
    several) against the float64 reference, forward and every gradient."""
    g = torch.Generator().manual_seed(3)
    positions = _positions([[1, 5, 17, 2], [7, 3, 1, 1, 13]]).to(torch.int32)
    batch, T, width, groups = 2, 25, 24, 3
    y = torch.randn(batch, T, width, generator=g).to(dtype)
    z = torch.randn(batch, T, width, generator=g).to(dtype)
    w = torch.rand(width, generator=g) + 0.5
    leaves = [t.clone().requires_grad_(True) for t in (y, z, w)]
    ref_leaves = [t.double().requires_grad_(True) for t in (y, z, w)]
    out = gated_rmsnorm_triton(*leaves, groups, 1e-5, transpoint, position_ids=positions)
    ref = gated_rmsnorm_naive(*ref_leaves, groups, 1e-5, transpoint, position_ids=positions)
    assert_close("out", ref, out.double(), ratio)
    dout = torch.randn(out.shape, generator=g)
    (out.float() * dout).sum().backward()
    (ref * dout.double()).sum().backward()
    for name, a, b in zip(("dy", "dz", "dw"), leaves, ref_leaves):
        if b.grad.abs().max() == 0:              # dz when no token is gated
            assert a.grad.abs().max() == 0, name
        else:
            assert_close(name, b.grad, a.grad.double(), ratio * 2)
    # tokens before their document's TransPoint are not gated: no z gradient
    assert leaves[1].grad[positions < transpoint].abs().sum() == 0


def test_naive_position_ids_is_each_document_alone():
    """The reference with per-token positions equals running it on each document alone."""
    g = torch.Generator().manual_seed(4)
    lengths = [4, 1, 9, 6]
    y = torch.randn(1, sum(lengths), 12, generator=g, dtype=torch.float64)
    z = torch.randn(1, sum(lengths), 12, generator=g, dtype=torch.float64)
    w = torch.rand(12, generator=g, dtype=torch.float64)
    packed = gated_rmsnorm_naive(y, z, w, 2, 1e-5, 3, position_ids=_positions([lengths]))
    alone = torch.cat([gated_rmsnorm_naive(y_d, z_d, w, 2, 1e-5, 3)
                       for y_d, z_d in zip(y.split(lengths, 1), z.split(lengths, 1))], dim=1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-14)


def test_position_ids_default_is_the_row_position():
    g = torch.Generator().manual_seed(5)
    y, z = torch.randn(2, 9, 8, generator=g), torch.randn(2, 9, 8, generator=g)
    w = torch.ones(8)
    positions = torch.arange(9).expand(2, 9)
    torch.testing.assert_close(gated_rmsnorm_triton(y, z, w, 2, 1e-5, 4, position_ids=positions),
                               gated_rmsnorm_triton(y, z, w, 2, 1e-5, 4), rtol=0, atol=0)
    with pytest.raises(ValueError, match="position_ids"):
        gated_rmsnorm_triton(y, z, w, 2, 1e-5, 4, position_ids=positions.float())


@pytest.mark.parametrize("shape", [(5, 3, 24), (1, 1, 40), (33, 2, 96)])
@pytest.mark.parametrize("dtype,ratio", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_plain_rmsnorm_matches_float64(shape, dtype, ratio):
    """The ungated specialisation (the model's pre-norms, megatron's [S, B, d] layout)."""
    from transmamba_kernels.norm.gated_rmsnorm import rmsnorm_triton

    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g).to(dtype)
    w = torch.rand(shape[-1], generator=g) + 0.5
    leaves = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    ref_leaves = [x.double().requires_grad_(True), w.double().requires_grad_(True)]
    out = rmsnorm_triton(leaves[0], leaves[1], 1e-5)
    h = ref_leaves[0]
    ref = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * ref_leaves[1]
    assert out.dtype == dtype and out.shape == x.shape
    assert_close("out", ref, out.double(), ratio)
    dout = torch.randn(shape, generator=g)
    (out.float() * dout).sum().backward()
    (ref * dout.double()).sum().backward()
    assert_close("dx", ref_leaves[0].grad, leaves[0].grad.double(), ratio)
    assert_close("dw", ref_leaves[1].grad, leaves[1].grad.double(), ratio)
