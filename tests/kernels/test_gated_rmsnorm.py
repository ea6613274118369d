"""Fused gated grouped RMSNorm (Triton, CPU interpreter) against its reference in float64:
strided y / z, the attention prefix ``y_prefix``, launch budgets, determinism and
torch.compile. New buffers in the kernel modules are filled with NaN, so a skipped write fails."""

import pytest
import torch

pytest.importorskip("triton")

from helpers import assert_close, nan_filled_buffers  # noqa: E402
from launches import assert_compiled_matches_eager, forward_backward_launches  # noqa: E402
from transmamba_kernels.norm import gated_rmsnorm as norm_module  # noqa: E402
from transmamba_kernels.norm import rmsnorm as rmsnorm_module  # noqa: E402
from transmamba_kernels.norm.gated_rmsnorm import gated_rmsnorm_triton  # noqa: E402
from transmamba_kernels.norm.naive import gated_rmsnorm_naive  # noqa: E402


@pytest.fixture(autouse=True)
def nan_filled(monkeypatch):
    """New buffers of the kernel module are NaN-filled (helpers.nan_filled_buffers)."""
    nan_filled_buffers(monkeypatch, norm_module)
    nan_filled_buffers(monkeypatch, rmsnorm_module)


@pytest.fixture
def real_buffers(monkeypatch):
    """Plain torch.empty (the NaN fill would count as a launch)."""
    monkeypatch.setattr(norm_module, "torch", torch)
    monkeypatch.setattr(rmsnorm_module, "torch", torch)


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


def _mixer_views(batch, T, width, dtype, g):
    """z as the mixer passes it: a column slice of the in-projection output [B, T, in_width];
    y with a token stride other than C. Returns (in_proj leaf, y_wide leaf, z view, y view)."""
    in_proj = torch.randn(batch, T, 3 * width + 5, generator=g).to(dtype).requires_grad_(True)
    y_wide = torch.randn(batch, T, width + 3, generator=g).to(dtype).requires_grad_(True)
    return in_proj, y_wide, in_proj[..., 2:2 + width], y_wide[..., 1:1 + width]


@pytest.mark.parametrize("transpoint", [0, 3, 19])
def test_strided_y_and_z_are_bitwise_the_contiguous_result(transpoint):
    g = torch.Generator().manual_seed(6)
    batch, T, width, groups = 2, 19, 24, 3
    in_proj, y_wide, z, y = _mixer_views(batch, T, width, torch.float32, g)
    w = (torch.rand(width, generator=g) + 0.5).requires_grad_(True)
    leaves = [y.detach().contiguous().requires_grad_(True),
              z.detach().contiguous().requires_grad_(True), w.detach().clone().requires_grad_(True)]
    out = gated_rmsnorm_triton(y, z, w, groups, 1e-5, transpoint)
    ref = gated_rmsnorm_triton(*leaves[:2], leaves[2], groups, 1e-5, transpoint)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    dout = torch.randn(out.shape, generator=g)
    (out * dout).sum().backward()
    (ref * dout).sum().backward()
    for name, a, b in (("dy", y_wide.grad[..., 1:1 + width], leaves[0].grad),
                       ("dz", in_proj.grad[..., 2:2 + width], leaves[1].grad),
                       ("dw", w.grad, leaves[2].grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def _attention_prefix(batch, p, groups, gs, dtype, g):
    """y_prefix as grouped SDPA gives it: out [B, G, p, C/G] transposed to [B, p, G, C/G]."""
    out = torch.randn(batch, groups, p, gs, generator=g).to(dtype).requires_grad_(True)
    return out, out.transpose(1, 2)


@pytest.mark.parametrize("T,transpoint", [(19, 0), (19, 1), (19, 18), (19, 19), (1, 1), (40, 17)])
@pytest.mark.parametrize("dtype,ratio", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_y_prefix_matches_reference(T, transpoint, dtype, ratio):
    """Rows t < p read from the transposed attention output; y's rows there are NaN and never
    read, and get a zero gradient."""
    g = torch.Generator().manual_seed(7)
    batch, width, groups = 2, 24, 3
    gs = width // groups
    in_proj, y_wide, z, y = _mixer_views(batch, T, width, dtype, g)
    with torch.no_grad():
        y_wide[:, :transpoint] = float("nan")
    attn, y_prefix = _attention_prefix(batch, transpoint, groups, gs, dtype, g)
    w = (torch.rand(width, generator=g) + 0.5).requires_grad_(True)
    ref_y = y.detach().double().nan_to_num().requires_grad_(True)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (z, w, y_prefix)]
    out = gated_rmsnorm_triton(y, z, w, groups, 1e-5, transpoint, y_prefix=y_prefix)
    ref = gated_rmsnorm_naive(ref_y, ref_leaves[0], ref_leaves[1], groups, 1e-5, transpoint,
                              y_prefix=ref_leaves[2])
    assert_close("out", ref, out.double(), ratio)
    dout = torch.randn(out.shape, generator=g)
    (out.float() * dout).sum().backward()
    (ref * dout.double()).sum().backward()
    grads = (("dy", y_wide.grad[..., 1:1 + width], ref_y.grad),
             ("dz", in_proj.grad[..., 2:2 + width], ref_leaves[0].grad),
             ("dw", w.grad, ref_leaves[1].grad),
             ("dprefix", attn.grad.transpose(1, 2), ref_leaves[2].grad))
    for name, a, b in grads:
        if b is None or b.abs().sum() == 0:      # dz when no token is gated, dprefix at p = 0
            assert a.abs().sum() == 0, name
        else:
            assert_close(name, b, a.double(), ratio * 2)
    assert y_wide.grad[:, :transpoint].abs().sum() == 0


def test_y_prefix_is_bitwise_the_spliced_input():
    g = torch.Generator().manual_seed(8)
    batch, T, width, groups, p = 2, 11, 16, 2, 5
    _, _, z, y = _mixer_views(batch, T, width, torch.float32, g)
    _, y_prefix = _attention_prefix(batch, p, groups, width // groups, torch.float32, g)
    w = torch.rand(width, generator=g) + 0.5
    spliced = torch.cat([y_prefix.reshape(batch, p, width), y[:, p:]], dim=1)
    torch.testing.assert_close(gated_rmsnorm_triton(y, z, w, groups, 1e-5, p, y_prefix=y_prefix),
                               gated_rmsnorm_triton(spliced, z, w, groups, 1e-5, p),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="y_prefix"):
        gated_rmsnorm_triton(y, z, w, groups, 1e-5, p, y_prefix=y_prefix[:, :, :1])


def test_backward_is_deterministic():
    """The weight gradient over several partials (more rows than one backward program takes)."""
    g = torch.Generator().manual_seed(9)
    in_proj, y_wide, z, y = _mixer_views(3, 37, 24, torch.float32, g)
    w = (torch.rand(24, generator=g) + 0.5).requires_grad_(True)
    dout = torch.randn(3, 37, 24, generator=g)
    runs = [torch.autograd.grad(gated_rmsnorm_triton(y, z, w, 2, 1e-5, 9), (y, z, w), dout)
            for _ in range(2)]
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["plain", "positions", "prefix"])
def test_launches(real_buffers, weight_dtype, variant):
    """Forward 1 launch, backward 2, with strided y and z (and the prefix, positions)."""
    g = torch.Generator().manual_seed(10)
    batch, T, width, groups, p = 2, 9, 16, 2, 4
    _, _, z, y = _mixer_views(batch, T, width, torch.float32, g)
    w = torch.ones(width, dtype=weight_dtype, requires_grad=True)
    _, y_prefix = _attention_prefix(batch, p, groups, width // groups, torch.float32, g)
    positions = _positions([[4, 5], [9]]) if variant == "positions" else None
    prefix = y_prefix if variant == "prefix" else None
    inputs = [y, z, w] + ([prefix] if prefix is not None else [])
    forward, backward = forward_backward_launches(
        lambda y, z, w, *pre: gated_rmsnorm_triton(y, z, w, groups, 1e-5, p, positions,
                                                   *pre), inputs, torch.randn(batch, T, width))
    assert (forward.total, backward.total) == (1, 2), (forward.aten, backward.aten)


def test_compile_fullgraph_matches_eager(real_buffers):
    """The mixer's use: z a slice of the in-projection, the attention prefix transposed."""
    g = torch.Generator().manual_seed(11)
    batch, T, width, groups, p = 2, 9, 16, 2, 4
    in_proj = torch.randn(batch, T, 2 * width, generator=g, requires_grad=True)
    ssd = torch.randn(batch, T, width, generator=g, requires_grad=True)
    attn = torch.randn(batch, groups, p, width // groups, generator=g, requires_grad=True)
    w = (torch.rand(width, generator=g) + 0.5).requires_grad_(True)

    def mixer_tail(in_proj, ssd, attn, w):
        z = in_proj[..., width:]
        return gated_rmsnorm_triton(ssd, z, w, groups, 1e-5, p, y_prefix=attn.transpose(1, 2))

    assert_compiled_matches_eager(mixer_tail, [in_proj, ssd, attn, w])


@pytest.mark.parametrize("variant", sorted(norm_module.NORM_VARIANTS))
def test_every_variant_matches_reference(variant, monkeypatch):
    """Each kernel variant (tiles of 64 elements and at most 3 partials, so a backward program
    walks several tiles) against float64: T = 1 (fp32), T = 63 (fp16, packed documents, 3
    groups; not for "rows") and the attention prefix; then two backwards give the same bits."""
    cfg = dict(norm_module.NORM_VARIANTS[variant])
    if cfg["kernel"] == "tile":
        cfg.update(tile=64, bwd_tile=64, max_partials=3)
    monkeypatch.setattr(norm_module, "_NORM", cfg)
    g = torch.Generator().manual_seed(12)
    cases = [(1, 2, 0, None, False, torch.float32, 1e-6),
             (63, 3, 5, _positions([[1, 30, 32], [63]]), False, torch.float16, 2e-3),
             (19, 3, 7, None, True, torch.float32, 1e-6)]
    if cfg["kernel"] == "rows":         # the old one-row-at-a-time kernel: slow in the interpreter
        cases = cases[::2]
    for T, groups, transpoint, positions, prefix, dtype, ratio in cases:
        width = 4 * groups
        _, _, z, y = _mixer_views(2, T, width, dtype, g)
        w = (torch.rand(width, generator=g) + 0.5).requires_grad_(True)
        leaves = [y, z, w]
        attn, y_prefix = _attention_prefix(2, transpoint, groups, 4, dtype, g) if prefix else (None, None)
        if prefix:
            leaves.append(attn)
        ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
        ref_prefix = ref_leaves[3].transpose(1, 2) if prefix else None
        out = gated_rmsnorm_triton(y, z, w, groups, 1e-5, transpoint, positions, y_prefix)
        ref = gated_rmsnorm_naive(*ref_leaves[:3], groups, 1e-5, transpoint, positions, ref_prefix)
        assert_close(f"out T={T}", ref, out.double(), ratio)
        dout = torch.randn(out.shape, generator=g)
        grads = torch.autograd.grad(out, leaves, dout.to(dtype))
        ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
        for name, a, b in zip(("dy", "dz", "dw", "dprefix"), grads, ref_grads):
            if prefix and name == "dy":
                b = b.clone()
                b[:, :transpoint] = 0
            assert_close(f"{name} T={T}", b, a.double(), ratio * 2)
    again = torch.autograd.grad(gated_rmsnorm_triton(y, z, w, groups, 1e-5, transpoint, positions,
                                                     y_prefix), leaves, dout.to(dtype))
    for a, b in zip(grads, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
