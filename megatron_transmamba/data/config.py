"""Data options of a pretraining run (the ``data:`` section of a run config).

The seed is not here: it belongs to the training config and is passed to
``build_pretraining_datasets`` alongside the sequence length and sample counts.
"""

from __future__ import annotations

import dataclasses
import re

from megatron_transmamba.data.tokenizer import TOKENIZER_KINDS

_SPLIT_RE = re.compile(r"^\s*\d+(\.\d*)?(\s*,\s*\d+(\.\d*)?){0,2}\s*$")


@dataclasses.dataclass
class DataConfig:
    data_path: list[str] | None = None
    """Indexed dataset prefixes (``<prefix>.bin``/``.idx``), optionally interleaved with
    sampling weights as in megatron: ``["0.7", "a", "0.3", "b"]``. None means the embedded
    corpus (the Python standard library's sources), prepared under ``cache_dir``."""

    valid_data_path: list[str] | None = None
    """Indexed dataset prefixes the validation loss is measured on, optionally weighted like
    ``data_path`` (megatron's ``--valid-data-path``). When set, training reads all of
    ``data_path`` and ``split`` is not used: the two come from separate datasets, e.g. the
    train and valid splits of ``tools/data/build_code_corpus.py``, so the validation text is
    text the model never trained on. Needs ``data_path``."""

    valid_seed: int | None = None
    """With ``valid_data_path``: the seed that picks and orders the validation samples (None:
    ``training.seed``). A fixed value evaluates runs of different seeds on the same batches, so
    their losses differ by training only."""

    tokenizer: str = "byte"
    """``"byte"`` (UTF-8 bytes plus EOD, vocab 257) or ``"hf"`` (a tokenizer.json at
    ``tokenizer_path``). Must be the tokenizer the datasets in ``data_path`` were made with."""

    tokenizer_path: str | None = None
    """Path to a Hugging Face tokenizer.json containing ``<|endoftext|>``; only for ``"hf"``."""

    split: str = "98,2,0"
    """Train, validation, test weights of each dataset's documents, comma separated (not used
    with ``valid_data_path``)."""

    cache_dir: str = ".cache/megatron_transmamba"
    """Where the embedded corpus and GPTDataset's sample/shuffle indices are cached."""

    num_workers: int = 0
    """DataLoader worker processes per rank (0 loads in the training process)."""

    reset_at_eod: bool = False
    """Treat the documents packed into a sample as separate sequences: each sample is split
    after every EOD token, positions restart there (megatron's ``reset_position_ids``) and each
    micro-batch carries ``cu_seqlens``, so attention, conv and SSM state stay inside each
    document and every document gets its own TransPoints (megatron's ``reset_attention_mask``,
    done without a mask). The EOD token's prediction of the next document's first token is
    still a loss target. False: documents run into each other, as in plain GPT pretraining."""

    def validate(self, files: bool = True) -> None:
        """Raise ValueError naming ``data.<field>`` for the first bad value; then, with
        ``files``, check the datasets of ``data_path`` against the tokenizer
        (:meth:`check_files`)."""
        self._validate_data_path()
        self._validate_valid_data_path()
        self._validate_tokenizer()
        self._validate_split()
        if not isinstance(self.cache_dir, str) or not self.cache_dir:
            raise ValueError(f"data.cache_dir={self.cache_dir!r}: must be a non-empty path")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers!r}: must be an int >= 0")
        if not isinstance(self.reset_at_eod, bool):
            raise ValueError(f"data.reset_at_eod={self.reset_at_eod!r}: must be true or false")
        if files:
            self.check_files()

    def check_files(self) -> None:
        """Raise ValueError ``data.data_path: <file> ...; expected ...`` (one line, or
        ``data.valid_data_path: ...``) for a dataset of ``data_path`` or ``valid_data_path``
        that is missing, not an indexed dataset, a ``.bin`` that disagrees with its ``.idx``,
        no tokens, or token ids outside the tokenizer's vocabulary (indexed_files.py). Every
        rank runs it before anything is written."""
        if self.data_path is None:
            return  # build_pretraining_datasets makes the embedded corpus with this tokenizer
        from megatron_transmamba.data.indexed_files import check_indexed_dataset
        from megatron_transmamba.data.tokenizer import build_tokenizer

        vocab_size = build_tokenizer(self.tokenizer, self.tokenizer_path).vocab_size
        checks = [("data.data_path", self.blend())]
        if self.valid_data_path is not None:
            checks.append(("data.valid_data_path", self.valid_blend()))
        for name, (prefixes, _) in checks:
            for prefix in prefixes:
                try:
                    summary = check_indexed_dataset(prefix, vocab_size)
                except ValueError as err:
                    raise ValueError(f"{name}: {err}") from None
                if summary.tokens == 0:
                    raise ValueError(f"{name}: {prefix}.idx holds no tokens; expected "
                                     "at least one document")

    def blend(self) -> tuple[list[str], list[float] | None] | None:
        """``data_path`` as megatron's blend: (prefixes, weights or None); None for the
        embedded corpus."""
        self._validate_data_path()
        return parse_data_path(self.data_path) if self.data_path is not None else None

    def valid_blend(self) -> tuple[list[str], list[float] | None] | None:
        """``valid_data_path`` as megatron's blend; None when validation comes from ``split``."""
        self._validate_valid_data_path()
        if self.valid_data_path is None:
            return None
        return parse_data_path(self.valid_data_path, "data.valid_data_path")

    def _validate_data_path(self) -> None:
        _validate_prefixes("data.data_path", self.data_path)

    def _validate_valid_data_path(self) -> None:
        if self.valid_seed is not None and (isinstance(self.valid_seed, bool)
                                            or not isinstance(self.valid_seed, int)):
            raise ValueError(f"data.valid_seed={self.valid_seed!r}: expected an integer or None")
        if self.valid_data_path is None:
            if self.valid_seed is not None:
                raise ValueError("data.valid_seed needs data.valid_data_path (with data.split the "
                                 "validation samples follow training.seed)")
            return
        _validate_prefixes("data.valid_data_path", self.valid_data_path)
        if self.data_path is None:
            raise ValueError("data.valid_data_path needs data.data_path (the training datasets); "
                             "the embedded corpus has no separate validation set")

    def _validate_tokenizer(self) -> None:
        if self.tokenizer not in TOKENIZER_KINDS:
            raise ValueError(
                f"data.tokenizer={self.tokenizer!r}: expected one of {TOKENIZER_KINDS}"
            )
        if self.tokenizer == "hf" and not self.tokenizer_path:
            raise ValueError(
                "data.tokenizer_path must name a tokenizer.json when data.tokenizer='hf'"
            )
        if self.tokenizer == "byte" and self.tokenizer_path is not None:
            raise ValueError(
                f"data.tokenizer_path={self.tokenizer_path!r} is only used with data.tokenizer='hf'"
            )

    def _validate_split(self) -> None:
        if not isinstance(self.split, str) or not _SPLIT_RE.match(self.split):
            raise ValueError(
                f"data.split={self.split!r}: expected 1 to 3 comma-separated non-negative "
                "numbers, e.g. '98,2,0'"
            )
        if float(self.split.split(",")[0]) <= 0:
            raise ValueError(f"data.split={self.split!r}: the train weight must be positive")


def _as_weight(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _validate_prefixes(name: str, paths) -> None:
    if paths is None:
        return
    if isinstance(paths, str) or not isinstance(paths, (list, tuple)):
        raise ValueError(
            f"{name}={paths!r}: must be a list of dataset prefixes "
            "(optionally weighted: ['0.7', 'a', '0.3', 'b']) or None"
        )
    if not paths or not all(isinstance(p, str) and p for p in paths):
        raise ValueError(f"{name}={paths!r}: needs non-empty strings")
    parse_data_path(paths, name)


def parse_data_path(data_path: list[str], name: str = "data.data_path"
                    ) -> tuple[list[str], list[float] | None]:
    """``["a", "b"]`` -> (["a", "b"], None); ``["0.7", "a", "0.3", "b"]`` ->
    (["a", "b"], [0.7, 0.3]). Unlike megatron's ``get_blend_from_list``, a list that mixes the
    two forms is an error (naming the field ``name``) rather than a list of prefixes."""
    weights = [_as_weight(text) for text in data_path[0::2]]
    names_are_weights = [_as_weight(text) is not None for text in data_path[1::2]]
    weighted = len(data_path) % 2 == 0 and all(w is not None for w in weights)
    if weighted and not any(names_are_weights):
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"{name}={data_path!r}: weights must be >= 0 and not all zero"
            )
        return [p.strip() for p in data_path[1::2]], weights
    if any(_as_weight(text) is not None for text in data_path):
        raise ValueError(
            f"{name}={data_path!r}: give either only prefixes or weight, prefix pairs"
        )
    return [p.strip() for p in data_path], None
