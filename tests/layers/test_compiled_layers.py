"""Every layer kind traces whole under ``torch.compile(fullgraph=True)`` with the triton backend
(the Triton kernels are custom ops with fake implementations), and the compiled layer computes
what the eager one does, forward and backward. TransMamba layers at p = 0, T/4 and T; each called
as the model calls it in training (the residual stream, layers/norm.py: ``residual=`` a tensor,
or None for a stage's first layer) or plainly (CUDA graphs, inference)."""

import pytest
import torch

from helpers import assert_close
from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.layers.rotary import rope_table
from megatron_transmamba.models.language_model import TransMambaLanguageModel
from megatron_transmamba.training.graphs import _register_dynamo_polyfills

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("megatron_single_process")

T = 32


def model(pattern: str, transpoints: list[int]) -> TransMambaLanguageModel:
    torch.manual_seed(0)
    schedule = dict(transpoint_schedule="list", transpoint_values=transpoints) if "T" in pattern \
        else {}
    cfg = TransMambaConfig(hidden_size=32, ffn_hidden_size=48, num_attention_heads=2,
                           num_query_groups=2, layer_pattern=pattern, seq_length=T,
                           **schedule,
                           mamba_num_heads=2, mamba_head_dim=16, mamba_num_groups=2,
                           mamba_state_dim=16, ssd_chunk_size=16, mixer_backend="triton",
                           use_cpu_initialization=True)
    return TransMambaLanguageModel(cfg, vocab_size=64)


def compiled(layer, **options):
    """What ``training.compile`` does to one layer (graphs.compile_layers), with ``options``."""
    torch._dynamo.reset()
    _register_dynamo_polyfills()
    return torch.compile(layer, fullgraph=True, dynamic=False, **options)


def run(layer, hidden, rope, grad, residual=None, form="plain"):
    """Output(s) and gradients of hidden, the residual (stream form) and the parameters."""
    leaf = hidden.clone().requires_grad_(True)
    inputs = [leaf]
    kwargs = {}
    if form != "plain":
        kwargs["residual"] = None
        if form == "stream":
            kwargs["residual"] = residual.clone().requires_grad_(True)
            inputs.append(kwargs["residual"])
    out = layer(leaf, attention_mask=None, rotary_pos_emb=rope, **kwargs)
    outs = out[:1] if form == "plain" else out
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(outs, [*inputs, *params], [grad] * len(outs), allow_unused=True)
    return [o.detach() for o in outs], grads, len(inputs)


@pytest.mark.parametrize("symbol, transpoint, form", [
    ("T", 0, "stream"), ("T", T // 4, "stream"), ("T", T, "plain"), ("M", 0, "first"),
    ("*", None, "stream"), ("-", None, "stream"), ("-", None, "plain")])
def test_compiled_layer_equals_eager(symbol, transpoint, form):
    lm = model(symbol, [transpoint if transpoint is not None else 0])
    assert lm.residual_stream
    layer = lm.layers[0]
    if symbol == "T":
        assert layer.transpoint == transpoint
    dim = lm.config.mamba_state_dim if symbol in "TM" else lm.config.kv_channels
    rope = rope_table(T, dim, 10000.0)
    hidden, residual, grad = torch.randn(T, 2, 32), torch.randn(T, 2, 32), torch.randn(T, 2, 32)
    eager = run(layer, hidden, rope, grad, residual, form)
    fast = run(compiled(layer, backend="aot_eager"), hidden, rope, grad, residual, form)
    for name, a, b in zip(["out", "residual"], eager[0], fast[0]):
        assert_close(name, a, b, 1e-6)
    names = ["hidden", "residual"][:eager[2]] + [n for n, p in layer.named_parameters()
                                                 if p.requires_grad]
    for name, a, b in zip(names, eager[1], fast[1]):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close(f"d{name}", a, b, 1e-6)


def test_mixer_inductor_compiles_and_matches_eager():
    """The default backend (inductor: generated code around the custom ops) at 0 < p < T."""
    lm = model("T", [T // 4])
    layer = lm.layers[0]
    rope = rope_table(T, 16, 10000.0)
    hidden, grad = torch.randn(T, 1, 32), torch.randn(T, 1, 32)
    eager = run(layer, hidden, rope, grad, hidden.flip(0), "stream")
    fast = run(compiled(layer), hidden, rope, grad, hidden.flip(0), "stream")
    for a, b in zip(eager[0], fast[0]):
        assert_close("out", a, b, 1e-5)
    for a, b in zip(eager[1], fast[1]):
        assert_close("grad", a, b, 1e-5)
