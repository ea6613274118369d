"""Launch counts of a block of code for the kernel tests: ``launch_counter.LaunchCounter`` (the
counter of ``tools/bench/count_launches.py``) as lists of aten ops and Triton kernels."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from megatron_transmamba.training.launch_counter import LaunchCounter


@dataclass
class Launches:
    aten: list = field(default_factory=list)       # op names, in order
    triton: list = field(default_factory=list)     # kernel names, in order

    @property
    def total(self) -> int:
        return len(self.aten) + len(self.triton)


@contextlib.contextmanager
def count_launches():
    """``with count_launches() as c: ...``; then ``c.total``, ``c.aten``, ``c.triton``."""
    launches = Launches()
    counter = LaunchCounter()
    try:
        with counter:
            yield launches
    finally:
        for name in counter.trace:
            if name.startswith("triton:"):
                launches.triton.append(name[len("triton:"):])
            else:
                launches.aten.append(name)


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
