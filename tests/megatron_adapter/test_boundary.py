"""The megatron-core boundary: outside ``megatron_transmamba/megatron_adapter/`` no module of the
package imports a private megatron-core name, reads a private attribute of megatron-core,
changes megatron-core (assigns to its modules or classes, replaces a megatron-core method on an
object, overrides a private megatron-core method in a subclass) or reads ``parallel_state``
(allowed in ``parallel/initialize.py`` too, which sets it up).

Read from the source (ast): a name is megatron-core's when it was bound by an import from
``megatron``; a method name is megatron-core's when a class of the installed megatron-core
defines it (and ``torch.nn.Module`` / ``torch.optim.Optimizer`` do not: our modules share
``forward`` and ``state_dict``); a private attribute is megatron-core's when megatron-core sets or
defines it and this package never does.
"""

from __future__ import annotations

import ast
import importlib
from functools import lru_cache
from pathlib import Path

import megatron.core
import torch

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_transmamba"
ADAPTER = PACKAGE / "megatron_adapter"
INITIALIZATION = PACKAGE / "parallel" / "initialize.py"
MEGATRON_CORE = Path(megatron.core.__file__).parent
# The megatron-core packages whose objects this package holds (models, optimizer, DDP,
# checkpoints, schedules): their method names are the ones an object must not have replaced.
OBJECT_PACKAGES = ("optimizer", "distributed", "dist_checkpointing", "transformer",
                   "tensor_parallel", "models/common", "pipeline_parallel")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _package_files(include_adapter: bool = False) -> list[Path]:
    return sorted(f for f in PACKAGE.rglob("*.py")
                  if include_adapter or ADAPTER not in f.parents)


def _parse(file: Path) -> ast.Module:
    return ast.parse(file.read_text(), filename=str(file))


@lru_cache(maxsize=None)
def _megatron_class_names() -> tuple[frozenset, frozenset]:
    """(method names defined in megatron-core's classes, private attributes megatron-core's
    classes define or set on ``self``)."""
    methods, private = set(), set()
    for file in MEGATRON_CORE.rglob("*.py"):
        holds_objects = any(part in file.relative_to(MEGATRON_CORE).as_posix()
                            for part in OBJECT_PACKAGES)
        for node in ast.walk(_parse(file)):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        if holds_objects:
                            methods.add(item.name)
                        if _private(item.name):
                            private.add(item.name)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id == "self"
                  and _private(node.attr)):
                private.add(node.attr)
    shared = set(dir(torch.nn.Module)) | set(dir(torch.optim.Optimizer)) | set(dir(object))
    return frozenset(methods - shared), frozenset(private - shared)


@lru_cache(maxsize=None)
def _our_names() -> frozenset:
    """Every function, class and attribute name this package defines or sets itself."""
    names = set()
    for file in _package_files(include_adapter=True):
        for node in ast.walk(_parse(file)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return frozenset(names)


def _megatron_bindings(tree: ast.Module) -> dict[str, str]:
    """Local name -> the dotted megatron path it was imported as (anywhere in the module)."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "megatron":
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        bound["megatron"] = "megatron"
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "megatron":
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return bound


def _root_name(node: ast.AST):
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _violations(file: Path, source: str | None = None) -> list[str]:
    tree = _parse(file) if source is None else ast.parse(source)
    where = file.relative_to(PACKAGE.parent)
    bound = _megatron_bindings(tree)
    methods, megatron_private = _megatron_class_names()
    ours = _our_names()
    found = []

    def report(node, text):
        found.append((node.lineno, f"{where}: {text}"))

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "megatron":
            parts = node.module.split(".")
            for alias in node.names:
                if any(_private(p) for p in parts) or _private(alias.name):
                    report(node, f"imports the private {node.module}.{alias.name}")
                if (node.module == "megatron.core" and alias.name == "parallel_state") or \
                        "parallel_state" in parts:
                    if file != INITIALIZATION:
                        report(node, "reads megatron-core's parallel_state")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "megatron" and any(_private(p) for p in parts):
                    report(node, f"imports the private {alias.name}")
                if parts[0] == "megatron" and "parallel_state" in parts \
                        and file != INITIALIZATION:
                    report(node, "reads megatron-core's parallel_state")
        elif isinstance(node, ast.Attribute):
            root = _root_name(node)
            on_megatron = root in bound
            if on_megatron and _private(node.attr):
                report(node, f"reads the private megatron-core attribute {node.attr}")
            rewrites_code = node.attr == "__code__" and not isinstance(node.ctx, ast.Load)
            if rewrites_code or node.attr == "substitute_in_graph":
                report(node, f"rewrites code ({node.attr}): a patch, which belongs in the adapter")
            if on_megatron and isinstance(node.ctx, (ast.Store, ast.Del)):
                report(node, f"assigns {node.attr} on megatron-core's {bound[root]}")
            elif isinstance(node.ctx, ast.Store) and root not in ("self", "cls") \
                    and node.attr in methods:
                report(node, f"replaces the megatron-core method {node.attr} on an object")
            elif not on_megatron and node.attr in megatron_private and node.attr not in ours:
                report(node, f"uses megatron-core's private {node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("setattr", "delattr") and node.args:
            target = _root_name(node.args[0])
            name = node.args[1].value if len(node.args) > 1 and \
                isinstance(node.args[1], ast.Constant) else None
            if target in bound or (name in methods and target not in ("self", "cls")):
                report(node, f"{node.func.id} on megatron-core ({target}.{name})")
        elif isinstance(node, ast.ClassDef):
            for base in node.bases:
                root = _root_name(base)
                if root not in bound:
                    continue
                module, _, name = bound[root].rpartition(".")
                base_class = getattr(importlib.import_module(module), name)
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                            and _private(item.name) and hasattr(base_class, item.name):
                        report(item, f"overrides megatron-core's private "
                                     f"{base_class.__name__}.{item.name}")
    return [f"{text} (line {line})" for line, text in sorted(found)]


def test_only_the_adapter_reaches_into_megatron_core():
    files = _package_files()
    assert INITIALIZATION in files and len(files) > 30
    violations = [v for file in files for v in _violations(file)]
    assert not violations, (
        "megatron-core internals outside megatron_transmamba/megatron_adapter/ (move the code "
        "there as a declared patch or override, use megatron-core's public API, or pass the "
        "process groups down instead of reading parallel_state):\n  "
        + "\n  ".join(violations))


def test_the_scan_finds_what_it_forbids():
    """Each rule fires on a module written to break it (the scan is not vacuous)."""
    source = '''
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import _get_cuda_rng_state
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.optimizer import clip_grads
from megatron.core.models.common.language_module.language_module import LanguageModule


class Model(LanguageModule):
    def _set_attention_backend(self):
        pass


def patch(optimizer, model):
    filesystem_async._results_queue = None
    clip_grads.l2_norm_impl = print
    optimizer.get_parameter_state_dp_zero = print
    setattr(clip_grads, "multi_tensor_scale_impl", print)
    patch.__code__ = patch.__code__
    return model._is_in_embd_group(), filesystem_async._get_write_results_queue
'''
    found = "\n".join(_violations(PACKAGE / "training" / "probe.py", source))
    for expected in ("reads megatron-core's parallel_state",
                     "imports the private megatron.core.tensor_parallel.random._get_cuda_rng_state",
                     "reads the private megatron-core attribute _results_queue",
                     "assigns _results_queue on megatron-core's",
                     "assigns l2_norm_impl on megatron-core's",
                     "replaces the megatron-core method get_parameter_state_dp_zero",
                     "setattr on megatron-core (clip_grads.multi_tensor_scale_impl)",
                     "uses megatron-core's private _is_in_embd_group",
                     "rewrites code (__code__)",
                     "overrides megatron-core's private LanguageModule._set_attention_backend"):
        assert expected in found, f"{expected!r} not in:\n{found}"

