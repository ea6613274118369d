"""Checks of megatron-core indexed datasets (``<prefix>.bin`` + ``<prefix>.idx``) before training.

megatron-core's ``IndexedDataset`` trusts its files: a missing, empty or foreign ``.idx`` fails
deep inside it (an assertion, ``cannot mmap an empty file``, then an AttributeError from its
``__del__``), a ``.bin`` shorter than its index fails only when a sample reaches the missing
bytes, and token ids beyond the tokenizer's vocabulary train silently when they fit the padded
embedding. :func:`check_indexed_dataset` reads the index header, checks its size, its sequence
pointers and the ``.bin`` size against each other, and, when the stored dtype can hold ids
outside ``[0, vocab_size)``, scans the ``.bin`` in chunks for them (once per process and file
version: disk speed, about 0.1 s per GB from the page cache). Each failure is one
:class:`DatasetFileError` line naming the file and what was expected.

The ``.idx`` layout (megatron-core 0.16, ``indexed_dataset._IndexReader``): 9 magic bytes,
version u64 = 1, dtype code u8, sequence count S u64, document count D u64, then
int32 lengths [S], int64 byte pointers [S] into the ``.bin``, int64 document indices [D].
"""

from __future__ import annotations

import dataclasses
import os
import struct

import numpy
from megatron.core.datasets.indexed_dataset import DType

INDEX_MAGIC = b"MMIDIDX\x00\x00"  # megatron-core's indexed_dataset._INDEX_HEADER
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents
_INTEGER_DTYPES = {code.value: getattr(numpy, code.name) for code in DType
                   if numpy.issubdtype(getattr(numpy, code.name), numpy.integer)}
_CHUNK = 1 << 24  # elements per step of the pointer and token scans
_checked_token_ids: set[tuple] = set()


class DatasetFileError(ValueError):
    """A dataset file that is missing or not what megatron-core's IndexedDataset expects."""


@dataclasses.dataclass(frozen=True)
class IndexSummary:
    dtype: type
    sequences: int
    documents: int
    tokens: int


def check_indexed_dataset(prefix: str, vocab_size: int | None = None) -> IndexSummary:
    """The header of ``prefix.idx`` after checking both files agree; with ``vocab_size``,
    also that every token id of ``prefix.bin`` is in ``[0, vocab_size)``.

    Raises DatasetFileError naming the file and what was expected."""
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    missing = [p for p in (bin_path, idx_path) if not os.path.isfile(p)]
    if missing:
        hint = ""
        if prefix.endswith((".bin", ".idx")):
            hint = f" (give the prefix {prefix[:-4]!r}, without .bin/.idx)"
        raise DatasetFileError(
            f"{' and '.join(missing)} not found{hint}; expected an indexed dataset "
            f"{prefix}.bin + .idx made by tools/data/preprocess_data.py"
        )
    try:
        summary = _read_index(idx_path, os.path.getsize(bin_path), bin_path)
        if vocab_size is not None:
            _check_token_ids(bin_path, summary, vocab_size)
    except OSError as err:  # unreadable, e.g. permissions
        raise DatasetFileError(f"{err.filename}: cannot be read ({err.strerror}); expected a "
                               "readable file") from None
    return summary


def _read_index(idx_path: str, bin_size: int, bin_path: str) -> IndexSummary:
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size or not head.startswith(INDEX_MAGIC):
        found = "is empty" if not head else f"starts with {head[:len(INDEX_MAGIC)]!r}"
        if head.startswith(INDEX_MAGIC):
            found = f"has {idx_size} bytes"
        raise DatasetFileError(
            f"{idx_path} {found}; expected a megatron-core index: {INDEX_MAGIC!r} and a "
            f"{_HEADER.size}-byte header"
        )
    _, version, code, sequences, documents = _HEADER.unpack(head)
    if version != 1:
        raise DatasetFileError(f"{idx_path}: index version {version}; expected 1")
    if code not in _INTEGER_DTYPES:
        raise DatasetFileError(
            f"{idx_path}: token dtype code {code}; expected an integer dtype code "
            f"{sorted(_INTEGER_DTYPES)}"
        )
    dtype = _INTEGER_DTYPES[code]
    expected = _HEADER.size + 12 * sequences + 8 * documents
    if idx_size != expected:
        raise DatasetFileError(
            f"{idx_path} has {idx_size} bytes; expected {expected} for its header's "
            f"{sequences} sequences and {documents} documents (truncated or not an index)"
        )
    index = numpy.memmap(idx_path, mode="r", dtype=numpy.uint8)
    lengths = index[_HEADER.size:][: 4 * sequences].view(numpy.int32)
    pointers = index[_HEADER.size + 4 * sequences:][: 8 * sequences].view(numpy.int64)
    doc_indices = index[_HEADER.size + 12 * sequences:].view(numpy.int64)
    itemsize = numpy.dtype(dtype).itemsize
    tokens = 0
    for start in range(0, sequences, _CHUNK):
        length = lengths[start:start + _CHUNK].astype(numpy.int64)
        starts = tokens * itemsize + numpy.concatenate(([0], numpy.cumsum(length[:-1]))) * itemsize
        bad = numpy.flatnonzero((length < 0) | (pointers[start:start + _CHUNK] != starts))
        if bad.size:
            raise DatasetFileError(
                f"{idx_path}: sequence {start + int(bad[0])} has length "
                f"{int(length[bad[0]])} at byte {int(pointers[start + bad[0]])}; expected "
                "non-negative lengths, each sequence starting where the previous one ends"
            )
        tokens += int(length.sum())
    if documents and (doc_indices[0] != 0 or doc_indices[-1] != sequences
                      or numpy.any(numpy.diff(doc_indices) < 0)):
        raise DatasetFileError(
            f"{idx_path}: document indices are not 0 .. {sequences} in order; expected the "
            "first sequence of each document"
        )
    if bin_size != tokens * itemsize:
        raise DatasetFileError(
            f"{bin_path} has {bin_size} bytes; expected {tokens * itemsize} "
            f"({tokens} tokens of {numpy.dtype(dtype).name} per {idx_path}): truncated, "
            "or the two files are from different datasets"
        )
    return IndexSummary(dtype, sequences, documents, tokens)


def _check_token_ids(bin_path: str, summary: IndexSummary, vocab_size: int) -> None:
    info = numpy.iinfo(summary.dtype)
    if info.min >= 0 and info.max < vocab_size:
        return  # the dtype cannot hold an id outside the vocabulary
    stat = os.stat(bin_path)
    key = (os.path.realpath(bin_path), stat.st_size, stat.st_mtime_ns, vocab_size)
    if key in _checked_token_ids:
        return
    tokens = numpy.memmap(bin_path, mode="r", dtype=summary.dtype) if summary.tokens else []
    for start in range(0, summary.tokens, _CHUNK):
        chunk = tokens[start:start + _CHUNK]
        if chunk.max() < vocab_size and (info.min >= 0 or chunk.min() >= 0):
            continue
        at = start + int(numpy.flatnonzero((chunk >= vocab_size) | (chunk < 0))[0])
        raise DatasetFileError(
            f"{bin_path} holds token id {int(tokens[at])} (token {at}); expected ids in "
            f"[0, {vocab_size}), the tokenizer's vocabulary: was the dataset made with "
            "another tokenizer?"
        )
    _checked_token_ids.add(key)
