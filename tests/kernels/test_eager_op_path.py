"""Eager calls of our custom ops run their bodies directly (``transmamba_kernels.custom_op``):
the same bits forward and backward as the registered op, every output included (rstd, SSD
states, ...), and the registered op is still what tracing, fake tensors, meta tensors and
autocast get."""

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

pytest.importorskip("triton")

from megatron_transmamba.layers import mixer_core  # noqa: E402
from megatron_transmamba.layers.rotary import rope_table  # noqa: E402
from transmamba_kernels.conv import causal_conv  # noqa: E402
from transmamba_kernels.cross_entropy import cross_entropy  # noqa: E402
from transmamba_kernels.custom_op import custom_op_path  # noqa: E402
from transmamba_kernels.norm import gated_rmsnorm, rmsnorm  # noqa: E402
from transmamba_kernels.rope import rope_qk  # noqa: E402
from transmamba_kernels.ssd import chunk  # noqa: E402
from transmamba_kernels.swiglu import swiglu  # noqa: E402


def _randn(*shape, grad=True):
    return torch.randn(*shape).requires_grad_(grad)


def _ssd_args(initial_states=False, dt_bias=True, D=True):
    """ssd_fwd at T = 20 (two chunks of 16), H = 2, G = 1, P = N = 8, TransPoint 3."""
    x, dt = _randn(1, 20, 2, 8), _randn(1, 20, 2)
    B, C = _randn(1, 20, 1, 8), _randn(1, 20, 1, 8)
    return (x, dt, _randn(2) if dt_bias else None, _randn(2), B, C, _randn(2) if D else None,
            _randn(1, 2, 8, 8) if initial_states else None, 16, 3, True, True, 0.0, math.inf)


def _core_args():
    x, dt = _randn(1, 20, 2, 8), _randn(1, 20, 2)
    B, C = _randn(1, 20, 1, 8), _randn(1, 20, 1, 8)
    return (x, dt, _randn(2), _randn(2), B, C, _randn(2), rope_table(20, 8, 10000.0), 5, 16,
            8 ** -0.5, True, 0.0, math.inf)


# (op, its arguments): every eager-called op of transmamba_kernels and the mixer core, with
# optional tensors given and None, and inputs that do not require grad
CASES = {
    "rmsnorm": lambda: (rmsnorm._rmsnorm_op, (_randn(5, 8), _randn(8), 1e-5)),
    "add_rmsnorm": lambda: (rmsnorm._add_rmsnorm_op, (_randn(5, 8), _randn(5, 8), _randn(8),
                                                      1e-5)),
    "add_rmsnorm_backward": lambda: (rmsnorm._add_rmsnorm_backward_op, (
        _randn(5, 8, grad=False), None, _randn(5, 8, grad=False), _randn(8, grad=False),
        torch.rand(5) + 0.5)),
    "gated_rmsnorm": lambda: (gated_rmsnorm._gated_rmsnorm_op, (
        _randn(1, 6, 8), _randn(1, 6, 8), _randn(8), 2, 1e-5, 2, None, None)),
    "gated_rmsnorm_prefix": lambda: (gated_rmsnorm._gated_rmsnorm_op, (
        _randn(1, 6, 8), _randn(1, 6, 8), _randn(8, grad=False), 2, 1e-5, 3, None,
        _randn(1, 3, 2, 4))),
    "gated_rmsnorm_positions": lambda: (gated_rmsnorm._gated_rmsnorm_op, (
        _randn(1, 6, 8), _randn(1, 6, 8), _randn(8), 2, 1e-5, 2,
        torch.tensor([[0, 1, 2, 0, 1, 2]]), None)),
    "causal_conv1d_silu": lambda: (causal_conv._conv_op, (_randn(1, 6, 8), _randn(8, 1, 4),
                                                          _randn(8), None)),
    "causal_conv1d_silu_documents": lambda: (causal_conv._conv_op, (
        _randn(1, 6, 8), _randn(8, 1, 4), _randn(8, grad=False),
        torch.tensor([[0, 0, 1, 1, 1, 2]], dtype=torch.int32))),
    "swiglu": lambda: (swiglu._swiglu_op, (_randn(4, 16),)),
    "rope_qk": lambda: (rope_qk._rope_qk_op, (_randn(1, 5, 2, 8), _randn(1, 5, 1, 8),
                                              rope_table(5, 8, 10000.0), False, False)),
    "cross_entropy": lambda: (cross_entropy._cross_entropy_op, (_randn(6, 10),
                                                                torch.randint(0, 10, (6,)))),
    "cross_entropy_stats": lambda: (cross_entropy._cross_entropy_stats_op, (
        _randn(6, 10, grad=False), torch.randint(0, 10, (6,)), 0)),
    "ssd_fwd": lambda: (chunk.ssd_fwd, _ssd_args()),
    "ssd_fwd_initial_states": lambda: (chunk.ssd_fwd, _ssd_args(True, dt_bias=False, D=False)),
    "core": lambda: (mixer_core._core_op, _core_args()),
}


def _custom_op_events(fn):
    """(fn's result, names of the transmamba ops dispatched while it ran)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, {e.name for e in prof.events() if e.name.startswith("transmamba::")}


def _forward_backward(op, args):
    """op's outputs and the gradients of the inputs that require grad (random output grads
    for the differentiable outputs)."""
    leaves = [a.detach().clone().requires_grad_(a.requires_grad)
              if isinstance(a, torch.Tensor) else a for a in args]
    out = op(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    diff = [o for o in outs if o.requires_grad]
    g = torch.Generator().manual_seed(1)
    grads = torch.autograd.grad(diff, wrt, [torch.randn(o.shape, generator=g) for o in diff]) \
        if diff else ()
    return outs, grads


@pytest.mark.parametrize("case", CASES)
def test_direct_path_equals_the_custom_op(case):
    op, args = CASES[case]()
    (outs, grads), events = _custom_op_events(lambda: _forward_backward(op, args))
    assert not events, events                     # forward and backward ran the bodies
    with custom_op_path():
        (ref_outs, ref_grads), ref_events = _custom_op_events(lambda: _forward_backward(op, args))
    assert op.op.name() in ref_events
    assert len(outs) == len(ref_outs) and len(grads) == len(ref_grads)
    for i, (out, ref) in enumerate(zip(outs, ref_outs)):
        assert out.requires_grad == ref.requires_grad and out.dtype == ref.dtype, i
        assert torch.equal(out, ref), f"output {i}"
    for i, (grad, ref) in enumerate(zip(grads, ref_grads)):
        assert torch.equal(grad, ref), f"gradient {i}"


def test_tracing_fake_meta_and_autocast_take_the_custom_op():
    x, w = torch.randn(5, 8), torch.randn(8)
    op = rmsnorm._rmsnorm_op
    graph = make_fx(lambda x, w: rmsnorm.rmsnorm_triton(x, w, 1e-5))(x, w)
    assert torch.ops.transmamba.rmsnorm.default in [n.target for n in graph.graph.nodes]
    with FakeTensorMode() as mode:                 # a dispatch mode
        fake_x, fake_w = mode.from_tensor(x), mode.from_tensor(w)
        out, rstd = op(fake_x, fake_w, 1e-5)
    assert out.shape == x.shape and rstd.shape == (5,)
    out, rstd = op(fake_x, fake_w, 1e-5)           # tensor subclasses, no mode active
    assert type(out) is type(fake_x) and rstd.shape == (5,)
    out, rstd = op(x.to("meta"), w.to("meta"), 1e-5)
    assert out.is_meta and rstd.shape == (5,)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, events = _custom_op_events(lambda: op(x, w, 1e-5))
    assert "transmamba::rmsnorm" in events


def test_torch_compile_traces_the_custom_ops_forward_and_backward():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append({n.target for n in gm.graph.nodes})
        return make_boxed_func(gm)

    def fn(x, residual, w):
        normed, summed = rmsnorm.add_rmsnorm_triton(x, residual, w, 1e-5)
        return normed * summed

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=keep,
                                                                      bw_compiler=keep))
    leaves = [torch.randn(5, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True),
              torch.randn(8, requires_grad=True)]
    compiled(*leaves).sum().backward()
    forward, backward = graphs
    assert torch.ops.transmamba.add_rmsnorm.default in forward
    assert torch.ops.transmamba.add_rmsnorm_backward.default in backward
