"""Text documents -> megatron-core indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``).

Each document is tokenized, followed by the tokenizer's EOD id, and stored as one sequence
of one document, the layout ``GPTDataset`` packs into fixed-length samples. Files are written
under temporary names and moved into place with ``os.replace``, ``.bin`` before ``.idx``, so
a reader never sees a half-written dataset under the final prefix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import itertools
import json
import os
import uuid
from typing import Iterable, Iterator, Sequence

import numpy
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from megatron_transmamba.data.indexed_files import DatasetFileError, check_indexed_dataset

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)

# Documents tokenized per call: lets HFTokenizer encode in parallel without holding a corpus.
_TOKENIZE_CHUNK = 256


@dataclasses.dataclass
class PreprocessStats:
    """What :func:`build_indexed_dataset` wrote."""

    documents: int
    """Documents written (empty documents are skipped)."""
    tokens: int
    """Tokens written, EOD tokens included."""
    skipped: int
    """Empty documents that were not written."""


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Files named by ``patterns`` (paths or globs), each glob's matches sorted, duplicates
    dropped; a pattern that matches nothing is an error."""
    files: dict[str, None] = {}
    for pattern in patterns:
        matches = [pattern]
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"input {pattern!r} matches no file")
        files.update(dict.fromkeys(matches))
    return list(files)


def iter_text_documents(path: str, split_lines: bool = False) -> Iterator[str]:
    """The whole file as one document, or each non-blank line as one (``split_lines``)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        if not split_lines:
            yield f.read()
            return
        for line in f:
            line = line.rstrip("\n")
            if line.strip():
                yield line


def iter_jsonl_documents(path: str, json_key: str = "text") -> Iterator[str]:
    """``record[json_key]`` of each line; blank lines are skipped, anything else that is not
    a JSON object with a string under ``json_key`` raises ValueError naming file and line."""
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not UTF-8 ({error.reason})") from error
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: invalid JSON ({error.msg})") from error
            if not isinstance(record, dict) or json_key not in record:
                raise ValueError(f"{path}:{line_number}: no key {json_key!r} in the JSON record")
            text = record[json_key]
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}:{line_number}: {json_key!r} is not a string "
                    f"(a {type(text).__name__})"
                )
            yield text


def iter_documents(
    files: Sequence[str], json_key: str = "text", split_lines: bool = False
) -> Iterator[str]:
    """Documents of ``files`` in order: ``.txt`` through :func:`iter_text_documents`,
    ``.jsonl`` through :func:`iter_jsonl_documents`."""
    for path in files:
        if path.endswith(TEXT_SUFFIXES):
            yield from iter_text_documents(path, split_lines)
        elif path.endswith(JSONL_SUFFIXES):
            yield from iter_jsonl_documents(path, json_key)
        else:
            raise ValueError(f"{path}: unsupported input; expected .txt or .jsonl")


@contextlib.contextmanager
def atomic_dataset_prefix(output_prefix: str) -> Iterator[str]:
    """Yield a temporary prefix to write ``.bin``/``.idx`` under; on success move both to
    ``output_prefix`` (``.bin`` first), on failure delete them."""
    directory = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(directory, exist_ok=True)
    tmp_prefix = os.path.join(
        directory, f".{os.path.basename(output_prefix)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    try:
        yield tmp_prefix
        os.replace(get_bin_path(tmp_prefix), get_bin_path(output_prefix))
        os.replace(get_idx_path(tmp_prefix), get_idx_path(output_prefix))
    finally:
        for path in (get_bin_path(tmp_prefix), get_idx_path(tmp_prefix)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def build_indexed_dataset(
    documents: Iterable[str], tokenizer, output_prefix: str, append_eod: bool = True
) -> PreprocessStats:
    """Tokenize ``documents`` with ``tokenizer`` (``tokenize``/``tokenize_batch``, ``eod``,
    ``vocab_size``) and write them atomically as the indexed dataset ``output_prefix``.

    Token ids are stored as uint16 when the vocabulary fits, else int32 (megatron's choice).
    Raises ValueError when no non-empty document was given.
    """
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    eod = numpy.array([tokenizer.eod], dtype=numpy.int64)
    tokenize_batch = getattr(tokenizer, "tokenize_batch", None) or (
        lambda texts: [tokenizer.tokenize(t) for t in texts]
    )
    stats = PreprocessStats(documents=0, tokens=0, skipped=0)
    with atomic_dataset_prefix(output_prefix) as tmp_prefix:
        builder = IndexedDatasetBuilder(get_bin_path(tmp_prefix), dtype=dtype)
        try:
            iterator = iter(documents)
            while chunk := list(itertools.islice(iterator, _TOKENIZE_CHUNK)):
                texts = [text for text in chunk if text]
                stats.skipped += len(chunk) - len(texts)
                for ids in tokenize_batch(texts):
                    if append_eod:
                        ids = numpy.concatenate([ids, eod])
                    builder.add_document(ids, [len(ids)])
                    stats.documents += 1
                    stats.tokens += len(ids)
        finally:
            builder.data_file.close()
        if stats.documents == 0:
            raise ValueError(f"{output_prefix}: no non-empty document to write")
        builder.finalize(get_idx_path(tmp_prefix))
    return stats


def dataset_is_complete(prefix: str) -> bool:
    """Whether ``prefix.bin`` and ``prefix.idx`` exist and agree: a readable index whose
    sequences end exactly at the end of the ``.bin`` file (``check_indexed_dataset``)."""
    try:
        check_indexed_dataset(prefix)
    except (DatasetFileError, OSError):
        return False
    return True
