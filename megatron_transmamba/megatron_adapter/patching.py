"""The kinds of change the adapter makes to megatron-core, each declared, undoable and checked.

A patch is a frozen description (``name``, ``targets``, ``reason``, ``cpu_only``, the
megatron-core ``versions`` it was checked against, ``on_demand``) whose ``apply()`` changes its
targets and returns what ``remove(record)`` needs to put back exactly the objects that were
there (the same objects, compared with ``is``). ``snapshot()`` reads those objects, so a test
can check that apply -> remove leaves every target as it was. The registry that applies them
once, in order, is ``megatron_adapter/__init__.py``.

Kinds: ``Replace`` (a module or class attribute replaced, optionally by a wrapper of the
original), ``CudaNames`` (inside one module, ``torch.cuda.<name>`` answered by a CPU stand-in),
``Constants`` (string constants of one function's code rewritten), ``LogFilter`` (one message
of one megatron logger dropped), ``Polyfill`` (a function replaced inside Dynamo-compiled code
only), ``Override`` (a subclass in the adapter that re-implements a megatron-core method) and
``PrivateCall`` (an adapter function that calls a private megatron-core method). The last two
change nothing of megatron-core; they are listed so that an upgrade reviews them.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import types
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

# The megatron-core releases every patch below was read and tested against.
CHECKED_VERSIONS: Tuple[str, ...] = ("0.16.1",)
_MISSING = object()


def resolve(target: str) -> Tuple[object, str]:
    """'pkg.module:Class.attr' -> (owner, attribute name); 'pkg.module' -> (module, '')."""
    module_name, _, qualname = target.partition(":")
    owner: object = importlib.import_module(module_name)
    if not qualname:
        return owner, ""
    *parents, name = qualname.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, name


def _own(owner: object, name: str):
    """The attribute as stored on ``owner`` itself (a staticmethod stays a staticmethod)."""
    return vars(owner).get(name, _MISSING)


def _put(owner: object, name: str, value) -> None:
    if value is _MISSING:
        delattr(owner, name)
    else:
        setattr(owner, name, value)


@dataclass(frozen=True)
class Patch:
    """What every kind declares. ``on_demand``: applied by the code that needs it (named there),
    not by ``megatron_adapter.apply()``."""

    name: str
    reason: str
    cpu_only: bool = False
    versions: Tuple[str, ...] = CHECKED_VERSIONS
    on_demand: Optional[str] = None

    @property
    def targets(self) -> Tuple[str, ...]:
        raise NotImplementedError

    @property
    def target(self) -> str:
        return "; ".join(self.targets)

    @property
    def modules(self) -> Tuple[str, ...]:
        """The megatron-core modules this patch touches (the CUDA tripwire checks them)."""
        return tuple(dict.fromkeys(t.partition(":")[0] for t in self.targets))

    def apply(self):
        """Change the targets; return the record ``remove`` needs, or None when the patch does
        not apply here (its condition is false) and nothing was changed."""
        raise NotImplementedError

    def remove(self, record) -> None:
        raise NotImplementedError

    def snapshot(self) -> tuple:
        """The objects this patch replaces, as they are now."""
        raise NotImplementedError


@dataclass(frozen=True)
class Replace(Patch):
    """Each ``replacements`` target ('module:Owner.attr') set to its replacement; with
    ``wraps``, to ``replacement(original)``. A target whose ``only_if(original)`` is false is
    left alone (e.g. Transformer Engine's kernel stands where megatron-core's local fallback
    would); with no target changed the patch does not apply here."""

    replacements: Tuple[Tuple[str, Callable], ...] = ()
    wraps: bool = False
    only_if: Optional[Callable[[object], bool]] = None

    @property
    def targets(self) -> Tuple[str, ...]:
        return tuple(target for target, _ in self.replacements)

    def apply(self):
        originals = {}
        for target, _ in self.replacements:
            owner, name = resolve(target)
            originals[target] = _own(owner, name)
            if originals[target] is _MISSING:
                raise RuntimeError(f"megatron_adapter {self.name}: {target} does not exist")
        changed = {}
        for target, replacement in self.replacements:
            original = originals[target]
            if self.only_if is not None and not self.only_if(original):
                continue
            owner, name = resolve(target)
            setattr(owner, name, replacement(original) if self.wraps else replacement)
            changed[target] = original
        return changed or None

    def remove(self, record) -> None:
        for target, original in record.items():
            _put(*resolve(target), original)

    def snapshot(self) -> tuple:
        return tuple(_own(*resolve(target)) for target in self.targets)


class ModuleView(types.ModuleType):
    """A module whose listed attributes are overridden; everything else is the original's."""

    def __init__(self, wrapped: types.ModuleType, overrides: Dict[str, object]):
        super().__init__(wrapped.__name__, wrapped.__doc__)
        self.__dict__["_wrapped"] = wrapped
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self.__dict__["_wrapped"], name)


@dataclass(frozen=True)
class CudaNames(Patch):
    """Inside one module only, the global ``torch`` becomes a view of torch whose ``cuda``
    answers ``names`` with the CPU stand-ins of ``stand_ins``; ``torch.cuda`` itself is never
    changed, for anyone."""

    module: str = ""
    names: Tuple[str, ...] = ()
    stand_ins: Tuple[Tuple[str, Callable], ...] = ()

    @property
    def targets(self) -> Tuple[str, ...]:
        return (f"{self.module}: torch.cuda.{{{', '.join(self.names)}}}",)

    @property
    def modules(self) -> Tuple[str, ...]:
        return (self.module,)

    def apply(self):
        module = importlib.import_module(self.module)
        original = module.__dict__.get("torch")
        if original is not torch:
            raise RuntimeError(f"megatron_adapter {self.name}: {self.module} has no global "
                               "`torch` to shim")
        stand_ins = dict(self.stand_ins)
        cuda = ModuleView(torch.cuda, {name: stand_ins[name] for name in self.names})
        module.torch = ModuleView(torch, {"cuda": cuda})
        return original

    def remove(self, record) -> None:
        importlib.import_module(self.module).torch = record

    def snapshot(self) -> tuple:
        return (importlib.import_module(self.module).__dict__.get("torch"),)


def _rewrite_constants(code: types.CodeType, mapping: Dict[object, object]) -> types.CodeType:
    def rewrite(value):
        if isinstance(value, types.CodeType):
            return _rewrite_constants(value, mapping)
        if isinstance(value, tuple):
            return tuple(rewrite(v) for v in value)
        if isinstance(value, frozenset):
            return frozenset(rewrite(v) for v in value)
        if isinstance(value, str) and value in mapping:
            return mapping[value]
        return value

    return code.replace(co_consts=tuple(rewrite(c) for c in code.co_consts))


def _string_constants(code: types.CodeType) -> List[str]:
    found = []
    for value in code.co_consts:
        if isinstance(value, types.CodeType):
            found += _string_constants(value)
        elif isinstance(value, (tuple, frozenset)):
            found += [v for v in value if isinstance(v, str)]
        elif isinstance(value, str):
            found.append(value)
    return found


@dataclass(frozen=True)
class Constants(Patch):
    """String constants in one function's code (nested functions included) rewritten in place,
    so every reference to the function sees the change."""

    function: str = ""
    mapping: Tuple[Tuple[str, str], ...] = ()

    @property
    def targets(self) -> Tuple[str, ...]:
        pairs = ", ".join(f"{old!r} -> {new!r}" for old, new in self.mapping)
        return (f"{self.function}: {pairs}",)

    @property
    def modules(self) -> Tuple[str, ...]:
        return (self.function.partition(":")[0],)

    def _function(self):
        owner, name = resolve(self.function)
        func = inspect.getattr_static(owner, name)
        return inspect.unwrap(getattr(func, "__func__", func))   # staticmethod, decorators

    def apply(self):
        func = self._function()
        present = set(_string_constants(func.__code__))
        missing = [old for old, _ in self.mapping if old not in present]
        if missing:
            raise RuntimeError(f"megatron_adapter {self.name}: {self.function} no longer "
                               f"contains {missing}")
        original = func.__code__
        func.__code__ = _rewrite_constants(original, dict(self.mapping))
        return original

    def remove(self, record) -> None:
        self._function().__code__ = record

    def snapshot(self) -> tuple:
        return (self._function().__code__,)


@dataclass(frozen=True)
class LogFilter(Patch):
    """One message dropped from one megatron logger (named after its module)."""

    logger: str = ""
    message: str = ""

    @property
    def targets(self) -> Tuple[str, ...]:
        return (f"logging.getLogger({self.logger!r}): {self.message!r}",)

    @property
    def modules(self) -> Tuple[str, ...]:
        return (self.logger,)

    def apply(self):
        message = self.message

        def drop(record: logging.LogRecord) -> bool:
            return record.getMessage() != message

        logging.getLogger(self.logger).addFilter(drop)
        return drop

    def remove(self, record) -> None:
        logging.getLogger(self.logger).removeFilter(record)

    def snapshot(self) -> tuple:
        return tuple(logging.getLogger(self.logger).filters)


# Polyfills registered with Dynamo in this process: a registration lasts for the life of the
# process (torch has no unregister), so ``remove`` turns a polyfill off through its flag.
_REGISTERED_POLYFILLS: set = set()


@dataclass(frozen=True)
class Polyfill(Patch):
    """``function`` replaced inside Dynamo-compiled code only (``torch.compiler.
    substitute_in_graph``); eager code keeps calling megatron-core's function, which is not
    changed. ``make()`` builds the traceable stand-in, which must do what the original does
    while the module-level bool ``flag`` ('module:NAME', read as a global so that Dynamo guards
    on it) is false; apply sets it, remove clears it."""

    function: str = ""
    make: Callable = None
    flag: str = ""

    @property
    def targets(self) -> Tuple[str, ...]:
        return (f"{self.function} (in torch.compile'd code)",)

    @property
    def modules(self) -> Tuple[str, ...]:
        return (self.function.partition(":")[0],)

    def apply(self):
        if self.name not in _REGISTERED_POLYFILLS:
            owner, name = resolve(self.function)
            torch.compiler.substitute_in_graph(getattr(owner, name))(self.make())
            _REGISTERED_POLYFILLS.add(self.name)
        setattr(*resolve(self.flag), True)
        return True

    def remove(self, record) -> None:
        setattr(*resolve(self.flag), False)

    def snapshot(self) -> tuple:
        owner, name = resolve(self.function)
        function = _own(owner, name)
        return (function, function.__code__, getattr(*resolve(self.flag)))


@dataclass(frozen=True)
class _Listed(Patch):
    """An entry that changes nothing of megatron-core but depends on its method ``method``:
    apply checks that the method exists, remove does nothing."""

    method: str = ""

    def apply(self):
        owner, name = resolve(self.method)
        if _own(owner, name) is _MISSING:
            raise RuntimeError(f"megatron_adapter {self.name}: {self.method} does not exist")
        return True

    def remove(self, record) -> None:
        return None

    def snapshot(self) -> tuple:
        owner, name = resolve(self.method)
        return (_own(owner, name),)


@dataclass(frozen=True)
class Override(_Listed):
    """A method that the adapter's subclass ``subclass`` of a megatron-core class re-implements
    (target: the megatron-core method). megatron-core itself is not changed, so apply and remove
    do nothing; it is listed, and version-checked, because it copies or bypasses megatron-core
    code that an upgrade may change."""

    subclass: str = ""

    @property
    def targets(self) -> Tuple[str, ...]:
        return (f"{self.method} (overridden by {self.subclass})",)


@dataclass(frozen=True)
class PrivateCall(_Listed):
    """A private megatron-core method that the adapter's function ``caller`` calls (target: the
    method). Nothing of megatron-core changes; it is listed, and version-checked, because a
    private method may change or go in any release."""

    caller: str = ""

    @property
    def targets(self) -> Tuple[str, ...]:
        return (f"{self.method} (called by {self.caller})",)
