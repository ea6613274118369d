"""Count kernel launches of a block of code on CPU, the way issue #15 counts them.

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
