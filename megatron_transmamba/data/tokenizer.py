"""Tokenizers that need no download: raw UTF-8 bytes, or a local HF ``tokenizer.json``.

Both subclass megatron-core's legacy tokenizer interface (``MegatronLegacyTokenizer``; the
0.16 name of ``megatron.core.datasets.megatron_tokenizer.MegatronTokenizer``), which is what
``GPTDataset`` reads: ``eod`` marks document ends, ``pad`` is the id it pads short samples with
(then masks out of the loss), and ``unique_identifiers`` feeds the hash of its index cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections import OrderedDict
from typing import Iterable, Sequence

import numpy
from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

EOD_TOKEN = "<|endoftext|>"

# Neither vocabulary has a pad token. -1 is never stored in a dataset, so GPTDataset can pad
# with it, mask those positions out of the loss and map them to id 0 without touching real data.
NO_PAD_ID = -1

TOKENIZER_KINDS = ("byte", "hf")


class _Tokenizer(MegatronLegacyTokenizer):
    """Common part: identifiers for the dataset cache hash and batch tokenization."""

    def __init__(self, **identifiers: str) -> None:
        # MegatronLegacyTokenizer.__init__ only fills these two fields and logs a deprecation
        # warning on every construction; fill them directly to keep the logs clean.
        self.unique_identifiers = OrderedDict(cls=type(self).__name__, **identifiers)
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)

    def tokenize_batch(self, texts: Sequence[str]) -> list[numpy.ndarray]:
        """Token ids of each text (int64 arrays), without EOD."""
        return [self.tokenize(text) for text in texts]

    @property
    def pad(self) -> int:
        return NO_PAD_ID


class ByteTokenizer(_Tokenizer):
    """UTF-8 bytes as ids 0..255 and an end-of-document token, id 256 (vocab_size 257)."""

    EOD_ID = 256

    def __init__(self) -> None:
        super().__init__()
        self._vocab = {f"<0x{i:02X}>": i for i in range(256)}
        self._vocab[EOD_TOKEN] = self.EOD_ID
        self._inv_vocab = {i: token for token, i in self._vocab.items()}

    def tokenize(self, text: str) -> numpy.ndarray:
        """int64 ids of the UTF-8 bytes of ``text``."""
        return numpy.frombuffer(text.encode("utf-8"), dtype=numpy.uint8).astype(numpy.int64)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Text of the byte ids; special ids are skipped, invalid UTF-8 becomes U+FFFD."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    @property
    def vocab(self) -> dict[str, int]:
        return self._vocab

    @property
    def inv_vocab(self) -> dict[int, str]:
        return self._inv_vocab

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eod(self) -> int:
        return self.EOD_ID


class HFTokenizer(_Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer loaded from a local tokenizer.json.

    The end-of-document id is that of ``<|endoftext|>``, which the file must contain.
    """

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        # The content hash, not only the path, decides whether cached dataset indices are reused.
        super().__init__(tokenizer_path=os.path.abspath(path), sha256=digest)
        self.path = path
        self.sha256 = digest
        self._tokenizer = Tokenizer.from_file(path)
        eod = self._tokenizer.token_to_id(EOD_TOKEN)
        if eod is None:
            raise ValueError(f"{path}: the tokenizer has no {EOD_TOKEN!r} token (needed as EOD)")
        self._eod = eod
        self._vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        self._inv_vocab = {i: token for token, i in self._vocab.items()}

    def tokenize(self, text: str) -> numpy.ndarray:
        """int64 ids of ``text`` (no special tokens added)."""
        return numpy.asarray(
            self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=numpy.int64
        )

    def tokenize_batch(self, texts: Sequence[str]) -> list[numpy.ndarray]:
        """Token ids of each text; the Rust side encodes the batch in parallel."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [numpy.asarray(e.ids, dtype=numpy.int64) for e in encodings]

    def detokenize(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` with special tokens skipped."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        return self._vocab

    @property
    def inv_vocab(self) -> dict[int, str]:
        return self._inv_vocab

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod


def build_tokenizer(kind: str, path: str | None = None) -> ByteTokenizer | HFTokenizer:
    """The tokenizer named by ``data.tokenizer`` (``"byte"`` or ``"hf"``) and
    ``data.tokenizer_path`` (a tokenizer.json, for ``"hf"`` only)."""
    if kind == "byte":
        if path is not None:
            raise ValueError(
                f"data.tokenizer_path={path!r} is only used with data.tokenizer='hf'; "
                "set it to None for the byte tokenizer"
            )
        return ByteTokenizer()
    if kind == "hf":
        if not path:
            raise ValueError(
                "data.tokenizer_path must name a tokenizer.json when data.tokenizer='hf'"
            )
        if not os.path.isfile(path):
            raise ValueError(f"data.tokenizer_path={path!r}: no such file")
        return HFTokenizer(path)
    raise ValueError(f"data.tokenizer={kind!r}: expected one of {TOKENIZER_KINDS}")


def train_bpe_tokenizer_from_iterator(
    texts: Iterable[str], vocab_size: int, output_path: str
) -> HFTokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style, special token ``<|endoftext|>``) on
    ``texts``, write it atomically to ``output_path`` (a tokenizer.json) and load it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(
            f"vocab_size={vocab_size}: byte-level BPE needs at least {len(alphabet) + 1} "
            f"(256 byte symbols and {EOD_TOKEN})"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    directory = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(directory, exist_ok=True)
    tmp_path = f"{output_path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tokenizer.save(tmp_path)
        os.replace(tmp_path, output_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
    return HFTokenizer(output_path)


def train_bpe_tokenizer(files: Sequence[str], vocab_size: int, output_path: str) -> HFTokenizer:
    """Train a byte-level BPE tokenizer on plain text files (one document per file); see
    :func:`train_bpe_tokenizer_from_iterator`."""

    def texts() -> Iterable[str]:
        for path in files:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()

    return train_bpe_tokenizer_from_iterator(texts(), vocab_size, output_path)
