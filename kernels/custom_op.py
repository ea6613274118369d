"""Custom ops that ``torch.compile`` traces and eager mode calls directly.

Every Triton kernel is a ``torch.library.custom_op`` with a fake implementation and an
autograd formula, so ``torch.compile(fullgraph=True)`` sees one opaque node per op. In eager
mode that machinery is pure host overhead: the dispatcher, ``fill_defaults``, torch's
generated ``autograd.Function`` and its dynamo-disabled frames cost several microseconds per
call, and a training step makes hundreds of calls. ``custom_op`` keeps the registered op for
every caller that needs it and otherwise runs the op's Python body itself, through an
``autograd.Function`` built from the same ``setup_context`` and ``backward`` that
``register_autograd`` registers. The op is taken when any of these holds (each is one C call
or one check per tensor argument):

- ``torch.compiler.is_compiling()`` (Dynamo and AOT tracing);
- a ``TorchDispatchMode`` is active (FakeTensorMode, make_fx, functionalization, the launch
  counter) or a ``TorchFunctionMode`` is;
- a tensor argument is a subclass (FakeTensor, FunctionalTensor, DTensor; ``Parameter`` is
  plain) or on the meta device (the op's meta kernel is its fake implementation);
- autocast is enabled for any device type;
- functorch transforms (vmap, grad, functionalize) are active;
- the call is of a backward op (no autograd formula) with grad enabled and an input that
  requires grad (double backward), so torch reports that as before;
- inside ``custom_op_path()``, which tests and benchmarks use to force it.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.compiler import is_compiling

__all__ = ["EagerCustomOp", "custom_op", "custom_op_path"]

_C = torch._C
_Parameter = torch.nn.Parameter
_OPTIONAL_TENSOR = _C.OptionalType.ofTensor()
_forced = 0          # > 0 inside ``custom_op_path()``


@contextlib.contextmanager
def custom_op_path():
    """Every ``custom_op`` call inside takes the registered op (tests, benchmarks)."""
    global _forced
    _forced += 1
    try:
        yield
    finally:
        _forced -= 1


class EagerCustomOp:
    """A functional ``torch.library.custom_op`` (``self.op``) whose eager calls run ``body``.

    Call it with positional arguments only (omitted trailing ones take their defaults).
    ``register_fake`` and ``register_autograd`` take what ``torch.library`` takes."""

    def __init__(self, qualname: str, body: Callable):
        self.body = body
        self._qualname = qualname
        self.custom_op = torch.library.custom_op(qualname, mutates_args=())(body)
        namespace, name = qualname.split("::")
        self.op = getattr(getattr(torch.ops, namespace), name).default
        schema = self.op._schema.arguments
        self._tensor_args = tuple(i for i, a in enumerate(schema)
                                  if a.type.isSubtypeOf(_OPTIONAL_TENSOR))
        self._nargs = len(schema)
        self._required = sum(not a.has_default_value() for a in schema)
        self._defaults = tuple(a.default_value for a in schema[self._required:])
        self._function: Optional[type] = None
        functools.update_wrapper(self, body)

    def register_fake(self, fake: Callable) -> Callable:
        self.custom_op.register_fake(fake)
        return fake

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        """Registers the formula on the op and builds the eager ``autograd.Function`` from the
        same two functions. Its forward takes ctx and calls ``setup_context`` itself (as
        torch's generated Function does): a Function with a ``setup_context`` staticmethod
        binds its arguments with ``inspect.signature`` on every ``apply``."""
        self.custom_op.register_autograd(backward, setup_context=setup_context)
        body = self.body

        def forward(ctx, *args):
            output = body(*args)
            setup_context(ctx, args, output)
            return output

        self._function = type(self._qualname.replace("::", "_"), (torch.autograd.Function,),
                              {"forward": staticmethod(forward),
                               "backward": staticmethod(backward)})

    def __call__(self, *args):
        n = len(args)
        if n < self._nargs:
            if n < self._required:
                raise TypeError(f"{self.op}: {self._required} arguments needed, got {n}")
            args += self._defaults[n - self._required:]
        if (_forced or is_compiling() or _C._len_torch_dispatch_stack()
                or _C._is_torch_function_mode_enabled() or _C._is_any_autocast_enabled()
                or _C._are_functorch_transforms_active()):
            return self.op(*args)
        needs_grad = False
        for i in self._tensor_args:
            t = args[i]
            if t is not None:
                if (type(t) is not Tensor and type(t) is not _Parameter) or t.is_meta:
                    return self.op(*args)
                needs_grad = needs_grad or t.requires_grad
        if needs_grad and _C.is_grad_enabled():
            if self._function is None:
                return self.op(*args)
            return self._function.apply(*args)
        return self.body(*args)


def custom_op(qualname: str) -> Callable[[Callable], EagerCustomOp]:
    """``torch.library.custom_op(qualname, mutates_args=())`` as an ``EagerCustomOp``."""
    return functools.partial(EagerCustomOp, qualname)
