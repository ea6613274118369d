"""Every mixer backend equals the ``torch`` reference backend, forward and backward."""

import pytest
import torch

from helpers import assert_close
from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.layers.rotary import rope_table
from megatron_transmamba.layers.transmamba_mixer import TransMambaMixer

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("megatron_single_process")


def make(backend):
    torch.manual_seed(0)
    cfg = TransMambaConfig(hidden_size=16, num_attention_heads=4, layer_pattern="T", seq_length=64,
                           transpoint_schedule="mamba", mamba_num_heads=4, mamba_head_dim=8,
                           mamba_num_groups=2, mamba_state_dim=16, ssd_chunk_size=16,
                           mixer_backend=backend, use_cpu_initialization=True)
    return TransMambaMixer(cfg, transpoint=0)


@pytest.mark.parametrize("T,p", [(37, 0), (37, 9), (37, 16), (37, 37), (5, 2)])
def test_triton_backend_equals_torch_backend(T, p):
    ref, fast = make("torch"), make("triton")
    fast.load_state_dict(ref.state_dict())
    hidden = torch.randn(T, 2, 16)
    table = rope_table(T, 16, 10000.0)
    outs, grads = [], []
    for mixer in (ref, fast):
        mixer.transpoint = p
        h = hidden.clone().requires_grad_(True)
        out, _ = mixer(h, rotary_pos_emb=table)
        out.pow(2).sum().backward()
        outs.append(out)
        grads.append([h.grad] + [q.grad for q in mixer.parameters()])
    assert_close("out", outs[0], outs[1], 1e-5)
    names = ["hidden"] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, grads[0], grads[1]):
        if a is None or a.abs().max() == 0:
            assert b is None or b.abs().max() == 0, name
            continue
        assert_close(f"d{name}", a, b, 1e-5)


@pytest.mark.parametrize("p, needs_grad", [(0, "all"), (1, "all"), (9, "all"), (16, "x"),
                                            (36, "BC"), (37, "all"), (9, "none"), (9, "x"),
                                            (9, "BC")])
def test_triton_core_splice_equals_torch_core(p, needs_grad):
    """The triton core (the custom op ``transmamba::core``: SSD, RoPE and SDPA on the prefix,
    whose backward hands attention's prefix gradients to the SSD kernels) equals the torch
    reference core: outputs and the gradients of the inputs that need one, also when only some
    inputs need gradients and without autograd."""
    from megatron_transmamba.layers.mixer_core import transmamba_core_torch, transmamba_core_triton
    from functools import partial
    from megatron_transmamba.layers.rotary import apply_rope
    torch.manual_seed(p)
    T, H, G, P, N = 37, 4, 2, 8, 16
    x, B, C = torch.randn(2, T, H, P), torch.randn(2, T, G, N), torch.randn(2, T, G, N)
    dt = torch.rand(2, T, H) * 0.5 + 0.05
    A, D = -torch.rand(H) - 0.5, torch.randn(H)
    table = rope_table(T, N, 10000.0)
    grad_of = {"all": "xBC", "x": "x", "BC": "BC", "none": ""}[needs_grad]
    results = []
    for core, rope in ((transmamba_core_torch, partial(apply_rope, table=table)),
                       (transmamba_core_triton, table)):
        inputs = {name: t.clone().requires_grad_(name in grad_of)
                  for name, t in (("x", x), ("B", B), ("C", C))}
        with torch.set_grad_enabled(bool(grad_of)):
            y = core(inputs["x"], dt, A, inputs["B"], inputs["C"], D, p, 16, N ** -0.5, rope)
        grads = {}
        if grad_of:
            y.pow(2).sum().backward()
            grads = {name: t.grad for name, t in inputs.items() if t.requires_grad}
        results.append((y.detach(), grads))
    assert_close("y", results[0][0], results[1][0], 1e-5)
    assert results[0][1].keys() == results[1][1].keys()
    for name in results[0][1]:
        assert_close(f"d{name}", results[0][1][name], results[1][1][name], 1e-5)


def test_pre_norm_uses_the_fused_kernel_with_the_triton_backend():
    """``layers/norm.RMSNorm`` (every pre-norm and the final norm) runs the fused Triton RMSNorm
    under ``mixer_backend: triton`` and gives the PyTorch norm's output and gradients."""
    from megatron_transmamba.layers.norm import RMSNorm

    norms = []
    for backend in ("torch", "triton"):
        cfg = make(backend).config
        norm = RMSNorm(cfg, 16, eps=1e-5)
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
        norms.append(norm)
    assert norms[0].fused is None and norms[1].fused is not None
    x = torch.randn(11, 2, 16)
    results = []
    for norm in norms:
        leaf = x.clone().requires_grad_(True)
        out = norm(leaf)
        (out * torch.arange(16.0)).sum().backward()
        results.append((out, leaf.grad, norm.weight.grad))
    for name, a, b in zip(("out", "dx", "dweight"), *results):
        assert_close(name, a, b, 1e-6)
