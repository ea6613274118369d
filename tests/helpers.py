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


def short_documents_corpus(prefix: str, alphabet: str, max_length: int, count: int) -> str:
    """An indexed byte-tokenised corpus at ``prefix`` of ``count`` random documents of 1 to
    ``max_length`` characters of ``alphabet`` (seeded): short documents, so packed samples hold
    several EOD tokens. Returns ``prefix``."""
    import random

    from megatron_transmamba.data.preprocess import build_indexed_dataset
    from megatron_transmamba.data.tokenizer import ByteTokenizer

    rng = random.Random(0)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, max_length)))
             for _ in range(count)]
    build_indexed_dataset(texts, ByteTokenizer(), prefix)
    return prefix


def perturb_norms_and_dt(model) -> None:
    """Make the mixers' dt, D and the norms non-trivial (a fresh model has unit norms and D),
    so an export or import that drops one of them changes the outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_weight", "D", "dt_bias")):
                p.add_(0.3 * torch.randn_like(p))
