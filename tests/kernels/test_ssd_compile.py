"""The SSD's custom ops under torch.compile(fullgraph=True) on CPU (Triton's interpreter): a
module calling the public functions, and an autograd.Function that hands prefix gradients
to ``ssd_backward`` (the TransMamba splice), compile without graph breaks and give eager's
results."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from transmamba_kernels.ssd.chunk import (chunk_ssd_triton, ssd_backward,  # noqa: E402
                                          ssd_forward, transmamba_ssd_triton)

NAMES = ("x", "dt", "dt_bias", "A_log", "B", "C", "D")


def make(T=37, H=2, P=8, G=1, N=16):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    return dict(x=r(2, T, H, P), dt=r(2, T, H), dt_bias=r(H), A_log=torch.rand(H, generator=g).log(),
                B=r(2, T, G, N), C=r(2, T, G, N), D=r(H))


def grads_of(fn, inputs, dy):
    leaves = [inputs[k].clone().requires_grad_(True) for k in NAMES]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach()] + [leaf.grad for leaf in leaves]


def mixer_ssd(x, dt, dt_bias, A_log, B, C, D):
    return transmamba_ssd_triton(x, dt, dt_bias, A_log, B, C, D, 16, 5, dt_limit=(0.01, 3.0)) * 2


def mamba_ssd(x, dt, dt_bias, A_log, B, C, D):
    y, final = chunk_ssd_triton(x, dt, -A_log.exp(), B, C, 16, D=D, dt_bias=dt_bias,
                                dt_softplus=True, return_final_states=True, transpoint=5)
    return y + final.sum()


class PrefixSplice(torch.autograd.Function):
    """A stand-in for attention on the prefix + SSD: the prefix rows' own gradients (here of
    sum(3 x[:, :p]), sum(B[:, :p]^2), sum(C[:, :p])) go into the SSD's backward kernels."""

    @staticmethod
    def forward(ctx, x, dt, dt_bias, A_log, B, C, D):
        y, saved = ssd_forward(x, dt, dt_bias, A_log, B, C, D, 16, 5)
        ctx.save_for_backward(x, dt, dt_bias, A_log, B, C, D, *saved)
        prefix = 3 * x[:, :5].sum() + (B[:, :5] ** 2).sum() + C[:, :5].sum()
        return y + prefix

    @staticmethod
    def backward(ctx, dy):
        x, dt, dt_bias, A_log, B, C, D, *saved = ctx.saved_tensors
        scale = dy.sum()
        pdx = 3 * scale * torch.ones_like(x[:, :5])
        pdb = 2 * scale * B[:, :5]
        pdc = scale * torch.ones_like(C[:, :5])
        return ssd_backward(dy, x, dt, dt_bias, A_log, B, C, D, tuple(saved), 16, 5,
                            prefix_dx=pdx, prefix_dB=pdb, prefix_dC=pdc)


def spliced(x, dt, dt_bias, A_log, B, C, D):
    return PrefixSplice.apply(x, dt, dt_bias, A_log, B, C, D)


@pytest.mark.parametrize("fn", [mixer_ssd, mamba_ssd, spliced], ids=["mixer", "mamba", "splice"])
def test_fullgraph_aot_eager_equals_eager(fn):
    inputs = make()
    dy = torch.randn(2, 37, 2, 8, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    eager = grads_of(fn, inputs, dy)
    compiled = grads_of(torch.compile(fn, fullgraph=True, backend="aot_eager"), inputs, dy)
    for name, a, b in zip(("y",) + NAMES, eager, compiled):
        assert torch.equal(a, b), name


def test_splice_equals_adding_the_prefix_gradients_outside():
    inputs = make()
    dy = torch.randn(2, 37, 2, 8, generator=torch.Generator().manual_seed(1))

    def outside(x, dt, dt_bias, A_log, B, C, D):
        y = transmamba_ssd_triton(x, dt, dt_bias, A_log, B, C, D, 16, 5)
        return y + 3 * x[:, :5].sum() + (B[:, :5] ** 2).sum() + C[:, :5].sum()

    for name, a, b in zip(("y",) + NAMES, grads_of(outside, inputs, dy), grads_of(spliced, inputs, dy)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)


def test_fullgraph_inductor_equals_eager():
    inputs = make(T=20)
    dy = torch.randn(2, 20, 2, 8, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    eager = grads_of(mixer_ssd, inputs, dy)
    compiled = grads_of(torch.compile(mixer_ssd, fullgraph=True), inputs, dy)
    for name, a, b in zip(("y",) + NAMES, eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=name)
