"""Test helpers shared by every test folder (import as ``from helpers import assert_close``)."""
import torch


def rel_rmse(ref, out):
    """rms(ref - out) / rms(ref), in float64; 0 when both are exactly zero."""
    ref, out = ref.detach().double(), out.detach().double()
    if ref.numel() == 0:
        return 0.0
    err = (ref - out).pow(2).mean().sqrt()
    base = ref.pow(2).mean().sqrt()
    if base == 0:
        return 0.0 if err == 0 else float("inf")
    return (err / base).item()


def assert_close(name, ref, out, ratio):
    """fla-style check: the relative RMSE of ``out`` against ``ref`` is at most ``ratio``.

    Fails on NaN/inf in either tensor and on a shape mismatch; the message names the tensor.
    """
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(ref).all(), f"{name}: reference has NaN/inf"
    assert torch.isfinite(out).all(), f"{name}: output has NaN/inf"
    err = rel_rmse(ref, out)
    msg = f"{name}: relative RMSE {err:.3e} (ratio {ratio:.1e})"
    assert err <= ratio, msg


def nan_filled_buffers(monkeypatch, module):
    """Make ``torch.empty`` / ``torch.empty_like`` inside ``module`` (a kernel wrapper) return
    NaN-filled tensors, so an output element a kernel forgets to write fails the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_filled(make):
        def empty(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return empty

    fake = type("torch_with_nan_empty", (), {})()
    for name in dir(torch):
        if not name.startswith("__"):
            try:
                setattr(fake, name, getattr(torch, name))
            except Exception:
                pass
    fake.empty, fake.empty_like = nan_filled(real_empty), nan_filled(real_empty_like)
    monkeypatch.setattr(module, "torch", fake)
