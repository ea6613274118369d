"""The default corpus: the Python standard library's own ``.py`` sources.

Every machine that runs this project has them, so a pretraining run (and CI) works with no
download. Files are taken in sorted relative-path order, skipping site-packages and the
test/demo/tooling folders, up to a byte budget (default 4 MiB, a few seconds to preprocess on
a CPU); each file is one document. The result is cached as an indexed dataset with a JSON
manifest beside it; the manifest is written last, so its presence and agreement with the
current interpreter, budget and tokenizer is what makes a cached dataset reusable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import sysconfig
import uuid
from typing import Iterator, Sequence

from megatron_transmamba.data.preprocess import build_indexed_dataset, dataset_is_complete
from megatron_transmamba.data.tokenizer import build_tokenizer

DEFAULT_BYTE_BUDGET = 4 * 1024 * 1024

EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "ensurepip",
        "encodings",  # generated codec tables: repetitive, not representative source
        "__pycache__",
    }
)


def stdlib_root() -> str:
    """The directory of the running interpreter's standard library."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_source_files(byte_budget: int = DEFAULT_BYTE_BUDGET) -> list[str]:
    """The corpus files: the longest prefix, in sorted relative-path order, of the standard
    library's ``.py`` files (outside :data:`EXCLUDED_DIRS`) whose sizes sum to at most
    ``byte_budget``; at least one file."""
    if byte_budget <= 0:
        raise ValueError(f"byte_budget={byte_budget}: must be positive")
    root = stdlib_root()
    relative_paths = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_DIRS]
        for name in names:
            if name.endswith(".py"):
                relative_paths.append(os.path.relpath(os.path.join(directory, name), root))
    # Sort on "/"-joined parts so the order does not depend on the platform's separator.
    relative_paths.sort(key=lambda p: p.split(os.sep))
    files, total = [], 0
    for relative_path in relative_paths:
        path = os.path.join(root, relative_path)
        size = os.path.getsize(path)
        if files and total + size > byte_budget:
            break
        files.append(path)
        total += size
    if not files:
        raise RuntimeError(f"no .py files found under the standard library at {root}")
    return files


def iter_source_documents(files: Sequence[str]) -> Iterator[str]:
    """The text of each file (UTF-8; undecodable bytes become U+FFFD)."""
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()


def _manifest(files: Sequence[str], byte_budget: int, tokenizer) -> dict:
    root = stdlib_root()
    listing = hashlib.sha256()
    for path in files:
        listing.update(f"{os.path.relpath(path, root)}\0{os.path.getsize(path)}\n".encode())
    return {
        "python": sys.version.split()[0],
        "byte_budget": byte_budget,
        "tokenizer": dict(tokenizer.unique_identifiers),
        "files": len(files),
        "bytes": sum(os.path.getsize(p) for p in files),
        "files_sha256": listing.hexdigest(),
    }


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp_path = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp_path, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)


def default_dataset_prefix(
    cache_dir: str, tokenizer_kind: str = "byte", tokenizer_path: str | None = None,
    byte_budget: int = DEFAULT_BYTE_BUDGET,
) -> str:
    """``<cache_dir>/stdlib_<tokenizer>_text_document``; ``<tokenizer>`` is ``byte`` or
    ``hf-<first 8 hex digits of the tokenizer.json sha256>``, and a non-default budget is
    appended (``byte-65536``) so differently sized corpora do not overwrite each other."""
    tag = tokenizer_kind
    if tokenizer_kind == "hf":
        tag = f"hf-{build_tokenizer('hf', tokenizer_path).sha256[:8]}"
    if byte_budget != DEFAULT_BYTE_BUDGET:
        tag = f"{tag}-{byte_budget}"
    return os.path.join(cache_dir, f"stdlib_{tag}_text_document")


def prepare_default_dataset(
    cache_dir: str,
    tokenizer_kind: str = "byte",
    tokenizer_path: str | None = None,
    byte_budget: int = DEFAULT_BYTE_BUDGET,
) -> str:
    """Build the standard-library corpus as an indexed dataset under ``cache_dir`` unless a
    complete one for the same interpreter, budget and tokenizer is there; return its prefix.

    Safe to call from several processes at once: each writes under its own temporary names
    and the results are identical, so the last ``os.replace`` wins harmlessly.
    """
    tokenizer = build_tokenizer(tokenizer_kind, tokenizer_path)
    prefix = default_dataset_prefix(cache_dir, tokenizer_kind, tokenizer_path, byte_budget)
    manifest_path = prefix + ".json"
    files = stdlib_source_files(byte_budget)
    manifest = _manifest(files, byte_budget, tokenizer)

    found = _read_json(manifest_path)
    if found is not None and dataset_is_complete(prefix):
        if {k: found.get(k) for k in manifest} == manifest:
            return prefix

    os.makedirs(cache_dir, exist_ok=True)
    if found is not None:
        # A stale manifest must not vouch for the files about to be replaced.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(manifest_path)
    stats = build_indexed_dataset(iter_source_documents(files), tokenizer, prefix)
    manifest.update(documents=stats.documents, tokens=stats.tokens)
    _write_json_atomic(manifest_path, manifest)
    return prefix
