"""Checks of issue #15 for the fused ops: kernel launches per forward / backward, and
``torch.compile(fullgraph=True)`` giving eager's results.

A launch is every aten op that reaches a backend, except views and allocations, plus one per
Triton kernel launch. Aten ops are seen by a ``TorchDispatchMode``; Triton launches by wrapping
the interpreter's launch entry (``InterpretedFunction.run``), with the aten counting switched
off while a kernel runs (the interpreter copies its arguments with aten ops). Our own custom
ops (namespace ``transmamba``) are not launches themselves: their bodies are counted.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
_NO_DATA = {"detach", "lift_fresh", "alias", "_unsafe_view", "clone_if_needed"}


class LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.aten: list[str] = []
        self.triton: list[str] = []
        self.in_kernel = False

    @property
    def total(self) -> int:
        return len(self.aten) + len(self.triton)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "transmamba":
            # run the op's CPU body with this mode active again, so its aten ops are counted
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU),
                                       *args, **kwargs)
        name = func.overloadpacket.__name__
        if not (self.in_kernel or func.is_view or name in _ALLOCATIONS or name in _NO_DATA):
            self.aten.append(str(func))
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_launches():
    """``with count_launches() as c: ...``; then ``c.total``, ``c.aten``, ``c.triton``."""
    from triton.runtime.interpreter import InterpretedFunction

    counter = LaunchCounter()
    real_run = InterpretedFunction.run

    def run(fn, *args, **kwargs):
        counter.triton.append(fn.__name__)
        counter.in_kernel = True
        try:
            return real_run(fn, *args, **kwargs)
        finally:
            counter.in_kernel = False

    InterpretedFunction.run = run
    try:
        with counter:
            yield counter
    finally:
        InterpretedFunction.run = real_run


def forward_backward_launches(fn, inputs, grad_outputs):
    """(forward launches, backward launches) of ``fn(*inputs)``; the backward is
    ``torch.autograd.grad`` of its outputs (one or a tuple) to every input that requires grad,
    so only the op's own backward runs (no accumulation into .grad)."""
    with count_launches() as forward:
        out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    with count_launches() as backward:
        torch.autograd.grad(outs, wrt, grad_outputs)
    return forward, backward


def assert_compiled_matches_eager(fn, leaves, seed=0):
    """``torch.compile(fn, fullgraph=True, backend="aot_eager")``: forward and the gradients of
    every leaf are the same bits as eager (one graph, no break, the same kernels)."""
    def run(f):
        grads = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
        out = f(*grads)
        outs = out if isinstance(out, tuple) else (out,)
        g = torch.Generator().manual_seed(seed)
        loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
        loss.backward()
        return outs, [t.grad for t in grads if t.requires_grad]

    torch._dynamo.reset()
    eager = run(fn)
    compiled = run(torch.compile(fn, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager[0] + tuple(eager[1]), compiled[0] + tuple(compiled[1])):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
