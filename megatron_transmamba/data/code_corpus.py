"""A larger local corpus, with no download: the ``.py`` sources of the installed packages.

The embedded corpus (``embedded_corpus.py``, the standard library, about 4 MB) is enough for a
smoke run but not for comparing models. Every machine that trains also has its site-packages
(torch, numpy, megatron-core, ...: some 100-250 MB of Python source). This module takes every
``.py`` file under the interpreter's site-packages directories (``sysconfig`` purelib and
platlib, ``site.getsitepackages()``), drops byte-identical copies (sha256 of the bytes), and
splits the files into train and validation **by package** (the top-level folder or module under
site-packages), so the validation loss is measured on code whose package the model never saw.
Packages are taken for validation in the order of a hash of their name (a fixed, arbitrary
order) until validation holds ``valid_fraction`` of the bytes (``validation_packages``). Each
split is written as a megatron-core indexed dataset with the existing
preprocessing (``preprocess.build_indexed_dataset``, one file = one document + EOD), and a JSON
manifest (files, bytes, tokens and packages per split, the directories read, duplicate counts,
a digest of the file list) is written last. The same installed files give the same datasets.

    <output>/train.bin, train.idx     data.data_path: [<output>/train]
    <output>/valid.bin, valid.idx     data.valid_data_path: [<output>/valid]
    <output>/manifest.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import site
import sys
import sysconfig
import uuid
from typing import Iterator, Sequence

from megatron_transmamba.data.preprocess import build_indexed_dataset, dataset_is_complete
from megatron_transmamba.data.tokenizer import build_tokenizer, train_bpe_tokenizer_from_iterator

DEFAULT_VALID_FRACTION = 0.05
"""Share of the bytes that goes to validation (whole packages, see validation_packages)."""
DEFAULT_MAX_FILE_BYTES = 1 << 20
"""Larger ``.py`` files are skipped: generated tables (unicode data, lexer maps), not code."""
PROJECT_PACKAGES = ("megatron_transmamba", "transmamba_kernels")
"""This repository's own packages, never part of the corpus (nor its editable-install hooks)."""
SPLITS = ("train", "valid")
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"


class CorpusError(ValueError):
    """Bad input of the corpus builder: one line naming the path and what was expected."""


@dataclasses.dataclass(frozen=True)
class SourceFile:
    package: str
    """Top-level folder under site-packages, or the module name of a top-level ``.py``."""
    relative_path: str
    """``/``-joined path under its site-packages directory."""
    path: str
    size: int
    sha256: str


def site_packages_dirs() -> list[str]:
    """The interpreter's site-packages directories that exist: sysconfig purelib and platlib,
    then ``site.getsitepackages()``; each once (by real path), none inside another."""
    paths = sysconfig.get_paths()
    candidates = [paths["purelib"], paths["platlib"], *site.getsitepackages()]
    found: dict[str, str] = {}
    for path in candidates:
        real = os.path.realpath(path)
        if os.path.isdir(real) and real not in found:
            found[real] = os.path.abspath(path)
    reals = list(found)
    return [found[r] for r in reals
            if not any(r != other and r.startswith(other + os.sep) for other in reals)]


def package_of(relative_path: str) -> str:
    """``numpy/core/x.py`` -> ``numpy``; ``six.py`` -> ``six``."""
    first = relative_path.split("/", 1)[0]
    return first[:-3] if first == relative_path and first.endswith(".py") else first


def validation_score(package: str) -> float:
    """A package's fixed place in [0, 1): the first 64 bits of sha256(name)."""
    return int(hashlib.sha256(package.encode()).hexdigest()[:16], 16) / 2.0**64


def _project_dirs() -> list[str]:
    dirs = []
    for name in PROJECT_PACKAGES:
        with contextlib.suppress(ImportError, ValueError):
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.submodule_search_locations:
                dirs += [os.path.realpath(p) for p in spec.submodule_search_locations]
    return dirs


def _is_project_entry(name: str) -> bool:
    return name in PROJECT_PACKAGES or name.startswith("__editable__") or name.endswith(".egg-link")


def _raise_unreadable(error: OSError) -> None:
    raise CorpusError(f"{error.filename}: cannot be read ({error.strerror}); expected a readable "
                      "site-packages tree") from None


def find_source_files(roots: Sequence[str], max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
                      ) -> tuple[list[SourceFile], dict]:
    """Every ``.py`` file under ``roots`` (no links followed, no ``__pycache__``, nothing of
    this project), sorted by (package, relative path, root); and counts of what was skipped."""
    if not roots:
        raise CorpusError("no site-packages directory to read; expected at least one")
    for root in roots:
        if not os.path.isdir(root):
            raise CorpusError(f"{root}: not a directory; expected a site-packages folder")
    project = _project_dirs()
    files, skipped_large, skipped_project = [], 0, set()
    for index, root in enumerate(roots):
        for directory, subdirs, names in os.walk(root, onerror=_raise_unreadable):
            top = directory == root
            if top:
                skipped_project.update(n for n in subdirs + names if _is_project_entry(n)
                                       and (n in subdirs or n.endswith(".py")))
                subdirs[:] = [d for d in subdirs if not _is_project_entry(d)]
            subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
            for name in sorted(names):
                if not name.endswith(".py") or (top and _is_project_entry(name)):
                    continue
                path = os.path.join(directory, name)
                if os.path.islink(path) or any(
                        os.path.realpath(path).startswith(p + os.sep) for p in project):
                    continue
                relative = os.path.relpath(path, root).replace(os.sep, "/")
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError as error:
                    _raise_unreadable(error)
                if len(data) > max_file_bytes:
                    skipped_large += 1
                    continue
                files.append((package_of(relative), relative, index, SourceFile(
                    package_of(relative), relative, path, len(data),
                    hashlib.sha256(data).hexdigest())))
    files.sort(key=lambda item: item[:3])
    return [item[3] for item in files], {"over_max_file_bytes": skipped_large,
                                         "project_entries": sorted(skipped_project)}


def validation_packages(files: Sequence[SourceFile], valid_fraction: float) -> list[str]:
    """The packages of the validation split: walking the packages in :func:`validation_score`
    order, each one is taken that keeps validation at most twice ``valid_fraction`` of all
    bytes, until validation holds ``valid_fraction`` of them (a bounded overshoot, so one
    large package such as torch cannot take a fifth of the corpus). At least one package goes
    to validation and at least one stays in training."""
    if isinstance(valid_fraction, bool) or not isinstance(valid_fraction, (int, float)) \
            or not 0 < valid_fraction < 1:
        raise CorpusError(f"valid_fraction={valid_fraction!r}: expected a number in (0, 1)")
    sizes: dict[str, int] = {}
    for f in files:
        sizes[f.package] = sizes.get(f.package, 0) + f.size
    order = sorted(sizes, key=lambda p: (validation_score(p), p))
    if len(order) < 2:
        found = f"only {order[0]!r}" if order else "none"
        raise CorpusError(f"the site-packages directories hold {found} of the packages with .py "
                          "files; expected at least 2 (one for training, one for validation)")
    target, taken, chosen = valid_fraction * sum(sizes.values()), 0, []
    for package in order[:-1]:                 # the last one always trains
        if taken >= target:
            break
        if taken + sizes[package] <= 2 * target:
            chosen.append(package)
            taken += sizes[package]
    return sorted(chosen or order[:1])


def split_by_package(files: Sequence[SourceFile], valid_fraction: float = DEFAULT_VALID_FRACTION
                     ) -> tuple[dict[str, list[SourceFile]], dict]:
    """{train, valid: files} and duplicate counts; the validation packages are
    :func:`validation_packages`. Duplicates: the first copy in sorted order is kept within a
    split, and validation drops every file whose bytes are also in training (no identical file
    on both sides)."""
    valid_packages = set(validation_packages(files, valid_fraction))
    splits: dict[str, list[SourceFile]] = {name: [] for name in SPLITS}
    seen: dict[str, str] = {}                   # content hash -> split of its kept copy
    removed, removed_bytes, across = 0, 0, 0
    for name in SPLITS:
        for f in files:
            if (f.package in valid_packages) != (name == "valid"):
                continue
            if f.sha256 in seen:
                removed += 1
                removed_bytes += f.size
                across += seen[f.sha256] != name
                continue
            seen[f.sha256] = name
            splits[name].append(f)
    if not splits["valid"]:
        raise CorpusError(f"every .py file of the validation packages {sorted(valid_packages)} "
                          "is also in a training package; expected some code of their own")
    return splits, {"removed": removed, "removed_bytes": removed_bytes,
                    "valid_copies_of_train_files": across}


def listing_digest(splits: dict[str, list[SourceFile]]) -> str:
    """sha256 over every kept file's split, package, path and content hash."""
    digest = hashlib.sha256()
    for name in SPLITS:
        for f in splits[name]:
            digest.update(f"{name}\0{f.package}\0{f.relative_path}\0{f.sha256}\n".encode())
    return digest.hexdigest()


def iter_documents(files: Sequence[SourceFile]) -> Iterator[str]:
    """The text of each file (UTF-8; undecodable bytes become U+FFFD)."""
    for f in files:
        try:
            with open(f.path, encoding="utf-8", errors="replace") as handle:
                yield handle.read()
        except OSError as error:
            _raise_unreadable(error)


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
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)


def build_code_corpus(output_dir: str, roots: Sequence[str] | None = None,
                      valid_fraction: float = DEFAULT_VALID_FRACTION,
                      max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, tokenizer_kind: str = "byte",
                      tokenizer_path: str | None = None, vocab_size: int = 8192,
                      log=lambda text: None) -> dict:
    """Build (or find up to date) the train and valid datasets under ``output_dir``; returns
    the manifest. ``roots``: the site-packages directories (default :func:`site_packages_dirs`).
    ``tokenizer_kind``: ``byte``, ``hf`` (``tokenizer_path``) or ``train-bpe`` (a byte-level BPE
    of ``vocab_size`` trained on the train split, written as ``<output>/tokenizer.json``).
    Every input is checked before anything is written; errors are one-line CorpusErrors."""
    if tokenizer_kind not in ("byte", "hf", "train-bpe"):
        raise CorpusError(f"tokenizer={tokenizer_kind!r}: expected byte, hf or train-bpe")
    if isinstance(max_file_bytes, bool) or not isinstance(max_file_bytes, int) or max_file_bytes < 1:
        raise CorpusError(f"max_file_bytes={max_file_bytes!r}: expected a positive integer")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise CorpusError(f"{output_dir}: exists and is not a directory; expected an output folder")
    roots = [os.path.abspath(r) for r in (site_packages_dirs() if roots is None else roots)]
    tokenizer = None
    if tokenizer_kind != "train-bpe":
        try:
            tokenizer = build_tokenizer(tokenizer_kind, tokenizer_path)
        except ValueError as err:
            raise CorpusError(str(err)) from None
    files, skipped = find_source_files(roots, max_file_bytes)
    if not files:
        raise CorpusError(f"no .py files under {', '.join(roots)}; expected site-packages folders "
                          "with Python sources")
    splits, duplicates = split_by_package(files, valid_fraction)
    request = {"tokenizer": tokenizer_kind, "valid_fraction": valid_fraction,
               "max_file_bytes": max_file_bytes, "sha256": listing_digest(splits)}
    if tokenizer_kind == "train-bpe":
        request["vocab_size"] = vocab_size
    else:
        request["tokenizer_identifiers"] = dict(tokenizer.unique_identifiers)

    manifest_path = os.path.join(output_dir, MANIFEST)
    prefixes = {name: os.path.join(output_dir, name) for name in SPLITS}
    found = _read_json(manifest_path)
    if found is not None and found.get("request") == request and all(
            dataset_is_complete(p) for p in prefixes.values()):
        log(f"{output_dir}: up to date (manifest {MANIFEST} matches the installed files)")
        return found

    os.makedirs(output_dir, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(manifest_path)        # a stale manifest must not vouch for the new files
    if tokenizer_kind == "train-bpe":
        tokenizer_path = os.path.join(output_dir, TOKENIZER_FILE)
        log(f"training a byte-level BPE of {vocab_size} tokens on the train split")
        tokenizer = train_bpe_tokenizer_from_iterator(iter_documents(splits["train"]), vocab_size,
                                                      tokenizer_path)
    summary = {}
    for name in SPLITS:
        stats = build_indexed_dataset(iter_documents(splits[name]), tokenizer, prefixes[name])
        packages = sorted({f.package for f in splits[name]})
        summary[name] = {"prefix": prefixes[name], "files": len(splits[name]),
                         "bytes": sum(f.size for f in splits[name]), "documents": stats.documents,
                         "tokens": stats.tokens, "packages": len(packages),
                         "package_names": packages}
        log(f"{name}: {len(packages)} packages, {len(splits[name]):,} files, "
            f"{summary[name]['bytes'] / 1e6:,.1f} MB, {stats.tokens:,} tokens -> "
            f"{prefixes[name]}.bin/.idx")
    manifest = {
        "request": request,
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "site_packages": roots,
        "tokenizer": dict(tokenizer.unique_identifiers),
        "tokenizer_path": tokenizer_path,
        "py_files_found": len(files),
        "duplicates": duplicates,
        "skipped": skipped,
        "splits": summary,
    }
    _write_json_atomic(manifest_path, manifest)
    return manifest
