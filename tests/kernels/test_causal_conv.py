"""Fused causal depthwise conv + SiLU (Triton, CPU interpreter) against its float64 reference.

The backward runs at its default variant and with the 2D-tile kernel at small tiles (several
row tiles per program, several programs per row and channel blocks that do not divide C), with
its x row shifts as register gathers or as shifted loads; every named variant (forward and
backward) runs once more on odd lengths, packed documents and W < 4. Also: the in-projection slice gives bitwise the contiguous
result, launch budgets (forward 1, backward 2), determinism and torch.compile. New buffers in
the kernel module are filled with NaN, so a skipped write fails.
"""

import pytest
import torch

pytest.importorskip("triton")

from helpers import assert_close, nan_filled_buffers  # noqa: E402
from launches import assert_compiled_matches_eager, forward_backward_launches  # noqa: E402
from transmamba_kernels.conv import causal_conv as conv_module  # noqa: E402
from transmamba_kernels.conv.causal_conv import causal_conv1d_silu_triton  # noqa: E402
from transmamba_kernels.conv.naive import causal_conv1d_silu_naive  # noqa: E402

BWD_TILINGS = {
    "default": dict(conv_module._BWD),
    "small": dict(kernel="tiles", block_t=16, block_c=16, tiles_per_program=2, num_warps=4,
                  gather_x=True),
    "small-loads": dict(kernel="tiles", block_t=16, block_c=16, tiles_per_program=2, num_warps=4,
                        gather_x=False),
}


@pytest.fixture(autouse=True)
def nan_filled(monkeypatch):
    """New buffers of the kernel module are NaN-filled (helpers.nan_filled_buffers)."""
    nan_filled_buffers(monkeypatch, conv_module)


@pytest.fixture
def real_buffers(monkeypatch):
    """Plain torch.empty (the NaN fill would count as a launch)."""
    monkeypatch.setattr(conv_module, "torch", torch)


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


def _in_proj_slice(batch, T, C, g, dtype=torch.float32):
    """xBC as the mixer passes it: a column slice of the in-projection output [B, T, width]."""
    in_proj = torch.randn(batch, T, 2 * C + 7, generator=g).to(dtype).requires_grad_(True)
    return in_proj, in_proj[..., 3:3 + C]


@pytest.mark.parametrize("packed", [False, True])
def test_strided_input_is_bitwise_the_contiguous_result(packed, bwd_tiling):
    g = torch.Generator().manual_seed(3)
    batch, T, C, W = 2, 45, 20, 4
    in_proj, x = _in_proj_slice(batch, T, C, g)
    weight = (torch.randn(C, 1, W, generator=g) * 0.5).requires_grad_(True)
    bias = (torch.randn(C, generator=g) * 0.1).requires_grad_(True)
    seq_idx = torch.cat([_documents([1, 2, 40, 2]), _documents([3, 31, 11]) + 4]) if packed else None
    leaves = [x.detach().contiguous().requires_grad_(True), weight.detach().clone().requires_grad_(True),
              bias.detach().clone().requires_grad_(True)]
    out = causal_conv1d_silu_triton(x, weight, bias, seq_idx)
    ref = causal_conv1d_silu_triton(*leaves, seq_idx)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    dout = torch.randn(out.shape, generator=g)
    (out * dout).sum().backward()
    (ref * dout).sum().backward()
    for a, b in ((in_proj.grad[..., 3:3 + C], leaves[0].grad), (weight.grad, leaves[1].grad),
                 (bias.grad, leaves[2].grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradients_in_each_inputs_dtype():
    """fp16 weight and bias with an fp32 input: their gradients in fp16, from the fp32 sums."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 30, 12, generator=g, requires_grad=True)
    weight = (torch.randn(12, 1, 4, generator=g) * 0.5).half().requires_grad_(True)
    bias = (torch.randn(12, generator=g) * 0.1).half().requires_grad_(True)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (x, weight, bias)]
    out = causal_conv1d_silu_triton(x, weight, bias)
    ref = causal_conv1d_silu_naive(*ref_leaves)
    assert_close("out", ref, out.double(), 1e-6)
    dout = torch.randn(out.shape, generator=g)
    (out * dout).sum().backward()
    (ref * dout.double()).sum().backward()
    assert (x.grad.dtype, weight.grad.dtype, bias.grad.dtype) == (torch.float32,) + (torch.float16,) * 2
    for name, a, b in zip(("dx", "dweight", "dbias"), (x, weight, bias), ref_leaves):
        assert_close(name, b.grad, a.grad.double(), 2e-6 if name == "dx" else 1e-3)


def test_backward_is_deterministic(bwd_tiling):
    g = torch.Generator().manual_seed(5)
    _, x = _in_proj_slice(2, 70, 20, g)
    weight = (torch.randn(20, 1, 4, generator=g) * 0.5).requires_grad_(True)
    bias = torch.randn(20, generator=g).requires_grad_(True)
    dout = torch.randn(2, 70, 20, generator=g)
    runs = [torch.autograd.grad(causal_conv1d_silu_triton(x, weight, bias), (x, weight, bias), dout)
            for _ in range(2)]
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_launches(real_buffers, param_dtype, packed):
    """Forward 1 launch on the strided slice, backward 2 (bf16 weight and bias: no casts)."""
    g = torch.Generator().manual_seed(6)
    _, x = _in_proj_slice(2, 33, 16, g)
    weight = torch.randn(16, 1, 4, generator=g).to(param_dtype).requires_grad_(True)
    bias = torch.randn(16, generator=g).to(param_dtype).requires_grad_(True)
    seq_idx = torch.cat([_documents([3, 30]), _documents([33])]) if packed else None
    forward, backward = forward_backward_launches(
        lambda x, w, b: causal_conv1d_silu_triton(x, w, b, seq_idx), [x, weight, bias],
        torch.randn(2, 33, 16, generator=g))
    assert (forward.total, backward.total) == (1, 2), (forward.aten, backward.aten)


def test_compile_fullgraph_matches_eager(real_buffers):
    g = torch.Generator().manual_seed(7)
    in_proj = torch.randn(2, 21, 40, generator=g, requires_grad=True)
    weight = (torch.randn(16, 1, 4, generator=g) * 0.5).requires_grad_(True)
    bias = torch.randn(16, generator=g).requires_grad_(True)
    seq_idx = torch.cat([_documents([5, 16]), _documents([21])])
    assert_compiled_matches_eager(
        lambda p, w, b: causal_conv1d_silu_triton(p[..., 8:24], w, b, seq_idx), [in_proj, weight, bias])


@pytest.mark.parametrize("variant", sorted(set(conv_module.BWD_VARIANTS) | set(conv_module.FWD_VARIANTS)))
def test_every_variant_matches_reference(variant, monkeypatch):
    """Each backward variant (16-row programs for the row walkers, so a row spans several
    programs) and each forward variant against float64 at T = 1 (fp32, W = 4) and T = 63 (fp16,
    packed documents, W = 3); then two backwards give the same bits."""
    backward = variant in conv_module.BWD_VARIANTS
    if backward:
        monkeypatch.setattr(conv_module, "_BWD", dict(conv_module.BWD_VARIANTS[variant],
                                                      programs_per_sm=10 ** 6))
    else:
        monkeypatch.setattr(conv_module, "_FWD", conv_module.FWD_VARIANTS[variant])
    g = torch.Generator().manual_seed(8)
    cases = [(1, 4, None, torch.float32, 1e-6),
             (63, 3, _documents([1, 30, 32]), torch.float16, 2e-3)]
    for T, W, seq_idx, dtype, ratio in cases:
        C = 13
        x = torch.randn(1, T, C + 3, generator=g).to(dtype)[..., 1:1 + C].requires_grad_(True)
        weight = (torch.randn(C, 1, W, generator=g) * 0.5).requires_grad_(True)
        bias = (torch.randn(C, generator=g) * 0.1).requires_grad_(True)
        ref_leaves = [t.detach().double().requires_grad_(True) for t in (x, weight, bias)]
        ref = causal_conv1d_silu_naive(*ref_leaves, seq_idx=seq_idx)
        if not backward:
            assert_close(f"out T={T}", ref, causal_conv1d_silu_triton(x, weight, bias, seq_idx).double(), ratio)
            continue
        dout = torch.randn(ref.shape, generator=g)
        grads = torch.ops.transmamba.causal_conv1d_silu_backward(
            dout.to(dtype), x.detach(), weight.detach(), bias.detach(), seq_idx)
        ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
        for name, a, b in zip(("dx", "dweight", "dbias"), grads, ref_grads):
            assert_close(f"{name} T={T}", b, a.double(), ratio * 2)
    if backward:
        again = torch.ops.transmamba.causal_conv1d_silu_backward(
            dout.to(dtype), x.detach(), weight.detach(), bias.detach(), seq_idx)
        for a, b in zip(grads, again):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
