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
