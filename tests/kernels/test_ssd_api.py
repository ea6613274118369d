"""The mixer's SSD entry points (``transmamba_ssd_triton``, ``ssd_forward`` / ``ssd_backward``)
against the float64 reference under Triton's CPU interpreter: raw dt with bias and softplus in
the kernels, A_log, dt_limit, D [H] and [H, P], odd T, TransPoints 0, 1, T - 1 and T, the
prefix-gradient hook, and bitwise-deterministic gradients. New buffers are NaN-filled.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from helpers import assert_close, nan_filled_buffers  # noqa: E402
from transmamba_kernels.ssd import chunk as chunk_module  # noqa: E402
from transmamba_kernels.ssd.chunk import (ssd_backward, ssd_forward,  # noqa: E402
                                          transmamba_ssd_triton)
from transmamba_kernels.ssd.naive import chunk_ssd_naive  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

NAMES = ("x", "dt", "dt_bias", "A_log", "B", "C", "D")


@pytest.fixture(autouse=True)
def nan_filled(monkeypatch):
    nan_filled_buffers(monkeypatch, chunk_module)


def mixer_inputs(batch, T, H, P, G, N, dtype, d_per_p=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return dict(x=r(batch, T, H, P).to(dtype), dt=r(batch, T, H).to(dtype), dt_bias=r(H) * 0.5,
                A_log=torch.rand(H, generator=g).log(), B=r(batch, T, G, N).to(dtype),
                C=r(batch, T, G, N).to(dtype), D=r(H, P) if d_per_p else r(H))


def reference(inputs, chunk, transpoint, dt_limit):
    """float64 y of the naive scan with the mixer's dt processing, rows before p zeroed."""
    leaves = {k: v.double().requires_grad_(True) for k, v in inputs.items()}
    y = chunk_ssd_naive(leaves["x"], leaves["dt"], -leaves["A_log"].exp(), leaves["B"],
                        leaves["C"], chunk, D=leaves["D"], dt_bias=leaves["dt_bias"],
                        dt_softplus=True, dt_limit=dt_limit)
    rows = (torch.arange(y.shape[1]) >= transpoint)[None, :, None, None]
    return y * rows, leaves


@pytest.mark.parametrize("T,transpoint", [(1, 0), (1, 1), (63, 0), (63, 1), (63, 62), (63, 63),
                                          (37, 0), (37, 1), (37, 36), (37, 37)])
def test_mixer_entry_matches_reference(T, transpoint):
    """G < H; T = 63 (four chunks, the last one short) reads D [H, P], T = 37 (three chunks,
    a short one, and a masked lane of the 4-chunk state-passing step) clamps dt to
    dt_limit."""
    check_mixer_entry(T, transpoint)


@pytest.mark.parametrize("T,transpoint", [(37, 36)])
def test_serial_passing_and_fused_backward_match_reference(T, transpoint, monkeypatch):
    """The other designs of ``chunk.DESIGN`` (one chunk per state-passing step, one program
    for the whole chunk backward), kept for comparison on GPUs, still match the reference."""
    monkeypatch.setitem(chunk_module.DESIGN, "passing", "serial")
    monkeypatch.setitem(chunk_module.DESIGN, "chunk_bwd", "fused")
    check_mixer_entry(T, transpoint)


def check_mixer_entry(T, transpoint):
    dt_limit = (0.05, 1.5) if T == 37 else (0.0, math.inf)
    inputs = mixer_inputs(2, T, 4, 8, 2, 16, torch.float32, d_per_p=T == 63)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y = transmamba_ssd_triton(*(leaves[k] for k in ("x", "dt", "dt_bias", "A_log", "B", "C", "D")),
                              16, transpoint, dt_limit=dt_limit)
    y_ref, ref_leaves = reference(inputs, 16, transpoint, dt_limit)
    assert y.dtype == torch.float32
    if transpoint < T:
        assert_close("y", y_ref, y.double(), 1e-5)
    else:
        assert y.abs().max() == 0
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    (y * dy).sum().backward()
    (y_ref * dy.double()).sum().backward()
    for name in NAMES:
        grad, ref = leaves[name].grad, ref_leaves[name].grad
        assert grad.dtype == inputs[name].dtype, name
        if name == "D" and transpoint >= T:
            assert grad.abs().max() == 0
        elif ref.abs().max() > 0:
            assert_close(f"d{name}", ref, grad.double(), 1e-5)
        else:  # zero up to cancellation (T = 1: the decay cancels in exp(Lam_t - Lam_s))
            assert grad.abs().max() < 1e-6, name


def test_mixer_entry_float16_with_bfloat16_parameters():
    """fp16 activations with bf16 parameters: each gradient in its input's dtype, within fp16
    rounding of the float64 reference."""
    inputs = mixer_inputs(1, 70, 2, 16, 2, 16, torch.float16)
    for k in ("dt_bias", "A_log", "D"):
        inputs[k] = inputs[k].bfloat16()
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y = transmamba_ssd_triton(*(leaves[k] for k in NAMES), 16, 5)
    y_ref, ref_leaves = reference(inputs, 16, 5, (0.0, math.inf))
    assert y.dtype == torch.float16
    assert_close("y", y_ref, y.double(), 2e-3)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    (y.float() * dy).sum().backward()
    (y_ref * dy.double()).sum().backward()
    for name, ratio in (("x", 3e-3), ("dt", 3e-3), ("B", 3e-3), ("C", 3e-3), ("D", 1e-2),
                        ("dt_bias", 5e-2), ("A_log", 5e-2)):
        assert leaves[name].grad.dtype == inputs[name].dtype, name
        assert_close(f"d{name}", ref_leaves[name].grad, leaves[name].grad.double(), ratio)


@pytest.mark.parametrize("G", [1, 2])
def test_prefix_gradients_are_added_inside_the_backward(G):
    """ssd_backward(prefix_dx, prefix_dB, prefix_dC) equals adding them to the SSD's own
    gradients outside, at rows t < p; the prefix gradients are strided views."""
    batch, T, H, P, N, p = 2, 37, 2, 8, 16, 21
    inputs = mixer_inputs(batch, T, H, P, G, N, torch.float32)
    args = [inputs[k] for k in NAMES]
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(batch, T, H, P, generator=g)
    pdx = torch.randn(batch, p + 3, H, P, generator=g)[:, 2:p + 2]           # token-offset view
    pbc = torch.randn(batch, p, 2 * G * N + 3, generator=g)                   # one tensor, split
    pdb = pbc[..., :G * N].unflatten(-1, (G, N))
    pdc = pbc[..., G * N:2 * G * N].unflatten(-1, (G, N))
    y, saved = ssd_forward(*args, 16, p)
    plain = ssd_backward(dy, *args, saved, 16, p)
    hooked = ssd_backward(dy, *args, saved, 16, p, prefix_dx=pdx, prefix_dB=pdb, prefix_dC=pdc)
    pad = lambda t: torch.cat([t, t.new_zeros(batch, T - p, *t.shape[2:])], 1)
    assert torch.equal(hooked[0], plain[0] + pad(pdx))
    assert_close("dB", plain[4] + pad(pdb), hooked[4], 1e-6)
    assert torch.equal(hooked[5][:, :p], pdc)        # C is not read before p
    assert torch.equal(hooked[5][:, p:], plain[5][:, p:])
    for name, a, b in zip(("dt", "dt_bias", "A_log", "D"), plain[1:4] + plain[6:], hooked[1:4] + hooked[6:]):
        assert torch.equal(a, b), name


def test_gradients_are_bitwise_deterministic():
    inputs = mixer_inputs(2, 37, 4, 8, 2, 16, torch.float32)
    args = [inputs[k] for k in NAMES]
    dy = torch.randn(2, 37, 4, 8, generator=torch.Generator().manual_seed(2))
    y, saved = ssd_forward(*args, 16, 9)
    first = ssd_backward(dy, *args, saved, 16, 9)
    second = ssd_backward(dy, *args, saved, 16, 9)
    for name, a, b in zip(("x", "dt", "dt_bias", "A_log", "B", "C", "D"), first, second):
        assert torch.equal(a, b), name
