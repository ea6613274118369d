"""Pretraining datasets and loaders on megatron-core's GPTDataset.

``build_pretraining_datasets`` turns a ``DataConfig`` into train/valid/test ``GPTDataset``s
(or ``BlendedDataset``s for weighted blends): documents are packed back to back, EOD between
them, into samples of ``seq_length + 1`` tokens, shuffled with the run's seed. Loaders walk
those samples in order with a Megatron-style batch sampler: global micro-batch ``g`` is
samples ``[g * M * D, (g + 1) * M * D)`` (M micro-batch size, D data-parallel size) and DP rank
``r`` takes the slice ``[r * M, (r + 1) * M)`` of it, so resuming from a consumed-sample count
reproduces exactly the batches an uninterrupted run would have seen.

With ``data.reset_at_eod`` each sample is split after every EOD token: GPTDataset restarts
``position_ids`` there (megatron's ``reset_position_ids``) and the loader's collate adds
``cu_seqlens``, the document offsets of the micro-batch (the model's packed-documents input).
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Iterator, Sequence

import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_transmamba.data.config import DataConfig
from megatron_transmamba.data.embedded_corpus import prepare_default_dataset
from megatron_transmamba.megatron_adapter.datasets import DatasetBuilder


def _prepare_embedded_corpus(cfg: DataConfig) -> str:
    """Rank 0 builds the corpus first; the others then find it complete (or, with a
    node-local cache_dir, build their own identical copy)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed:
        return prepare_default_dataset(cfg.cache_dir, cfg.tokenizer, cfg.tokenizer_path)
    if torch.distributed.get_rank() == 0:
        prefix = prepare_default_dataset(cfg.cache_dir, cfg.tokenizer, cfg.tokenizer_path)
        torch.distributed.barrier()
        return prefix
    torch.distributed.barrier()
    return prepare_default_dataset(cfg.cache_dir, cfg.tokenizer, cfg.tokenizer_path)


def data_fingerprint(prefixes: list[str]) -> str:
    """A short hash of the indexed datasets' files (size and modification time of every .bin
    and .idx). megatron-core keys its cached sample and shuffle indices by the dataset's path
    and settings only, so indices built for an older version of the same files (the
    embedded corpus rebuilt for another Python, a re-run of preprocessing) would index past
    the new documents; under the fingerprint a changed dataset gets fresh indices."""
    digest = hashlib.sha256()
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            stat = os.stat(prefix + suffix)
            digest.update(f"{os.path.abspath(prefix)}{suffix}\0{stat.st_size}\0"
                          f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def build_pretraining_datasets(
    cfg: DataConfig,
    tokenizer,
    seq_length: int,
    num_samples: tuple[int, int, int],
    seed: int,
    is_built_on_rank: Callable[[], bool] | None = None,
) -> tuple[GPTDataset | None, GPTDataset | None, GPTDataset | None]:
    """Train, validation and test datasets (None for a split of weight 0).

    Args:
        cfg: data options; ``cfg.data_path=None`` builds the embedded corpus first. With
            ``cfg.valid_data_path`` the train dataset is all of ``data_path``, the validation
            dataset all of ``valid_data_path`` (its samples drawn with ``cfg.valid_seed`` when
            set), and there is no test dataset.
        tokenizer: the tokenizer of the data (``eod``, ``pad``, ``vocab_size``,
            ``unique_identifiers``), e.g. from ``build_tokenizer(cfg.tokenizer, ...)``.
        seq_length: tokens per sample T; each sample is ``{"tokens", "labels",
            "position_ids"}`` int64 [T] and ``"loss_mask"`` float32 [T]; with
            ``cfg.reset_at_eod`` the positions restart after every EOD token.
        num_samples: samples to draw per split; datasets repeat over epochs to reach them.
        seed: the shuffle seed (from the training config).
        is_built_on_rank: under torch.distributed, whether this rank builds the datasets
            (others get None); default every rank. Without torch.distributed it is not called.

    Under torch.distributed, rank 0 writes the sample/shuffle indices to
    ``<cache_dir>/gpt_indices/<data fingerprint>`` and the other ranks read them there, so that
    directory must be shared by all nodes (megatron-core's rule).
    """
    cfg.validate()  # also the dataset files (DataConfig.check_files)
    if seq_length < 1:
        raise ValueError(f"seq_length={seq_length}: must be positive")
    if len(num_samples) != 3:
        raise ValueError(f"num_samples={num_samples!r}: need (train, valid, test)")

    if cfg.data_path is None:
        blend = ([_prepare_embedded_corpus(cfg)], None)
    else:
        blend = cfg.blend()
    valid_blend = cfg.valid_blend()
    if valid_blend is None:        # one distribution, cut into train / valid / test by split
        parts = [(seed, dict(blend=blend, split=cfg.split))]
        prefixes = blend[0]
    else:                          # megatron's --train-data-path / --valid-data-path
        valid_seed = seed if cfg.valid_seed is None else cfg.valid_seed
        parts = [(seed, dict(blend_per_split=[blend, None, None])),
                 (valid_seed, dict(blend_per_split=[None, valid_blend, None]))]
        prefixes = blend[0] + valid_blend[0]

    datasets = [None, None, None]
    for part_seed, sources in parts:
        config = GPTDatasetConfig(
            random_seed=part_seed,
            sequence_length=seq_length,
            **sources,
            path_to_cache=os.path.join(cfg.cache_dir, "gpt_indices", data_fingerprint(prefixes)),
            mmap_bin_files=True,
            tokenizer=tokenizer,
            # Without reset_at_eod attention runs across document boundaries, and so do
            # positions. With it the model keeps documents apart from cu_seqlens
            # (collate_documents), so no S x S mask is built. Either way the EOD token is a
            # prediction target like any other.
            reset_position_ids=cfg.reset_at_eod,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
        )
        if valid_blend is None:
            _check_splits_have_documents(blend[0], config.split_matrix, cfg.split)
        builder = DatasetBuilder(GPTDataset, list(num_samples), is_built_on_rank or (lambda: True),
                                 config)
        for i, dataset in enumerate(builder.build()):
            if dataset is not None:
                datasets[i] = dataset
    train, valid, test = datasets
    return train, valid, test


def _check_splits_have_documents(
    prefixes: list[str], split_matrix: list[tuple[float, float] | None], split: str
) -> None:
    """GPTDataset loops forever looking for enough epochs when a split it builds holds no
    tokens, so refuse that up front (same document ranges as megatron's builder)."""
    names = ("train", "valid", "test")
    for prefix in prefixes:
        num_documents = len(IndexedDataset(prefix).sequence_lengths)
        for name, bookends in zip(names, split_matrix):
            if bookends is None:
                continue
            begin = int(round(bookends[0] * num_documents))
            end = int(round(bookends[1] * num_documents))
            if end <= begin:
                raise ValueError(
                    f"data.split={split!r} gives the {name} split none of the {num_documents} "
                    f"documents of {prefix}; give that split weight 0 or use more documents"
                )


class PretrainingBatchSampler:
    """Megatron's ``MegatronPretrainingSampler``: sequential, deterministic, resumable.

    Yields, for each complete global micro-batch after the first ``consumed_samples``
    samples, this rank's ``micro_batch_size`` sample indices; an incomplete last global
    micro-batch is dropped.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ) -> None:
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise ValueError(
                f"micro_batch_size={micro_batch_size} and data_parallel_size="
                f"{data_parallel_size} must be positive"
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank={data_parallel_rank} not in [0, {data_parallel_size})"
            )
        global_micro_batch = micro_batch_size * data_parallel_size
        if consumed_samples < 0 or consumed_samples % global_micro_batch:
            # A count that is not a whole number of global micro-batches would shift every
            # later batch against the ones an uninterrupted run sees.
            raise ValueError(
                f"consumed_samples={consumed_samples} must be a non-negative multiple of "
                f"micro_batch_size * data_parallel_size = {global_micro_batch}"
            )
        if consumed_samples >= total_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples} >= the dataset's {total_samples} samples: "
                "it is exhausted; build it with more samples"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.global_micro_batch = global_micro_batch

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.global_micro_batch

    def __iter__(self) -> Iterator[list[int]]:
        offset = self.data_parallel_rank * self.micro_batch_size
        last_start = self.total_samples - self.global_micro_batch
        for start in range(self.consumed_samples, last_start + 1, self.global_micro_batch):
            first = start + offset
            yield list(range(first, first + self.micro_batch_size))


def build_data_loader(
    dataset: Sequence | None,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int,
) -> torch.utils.data.DataLoader | None:
    """This DP rank's loader over ``dataset`` (None for None), resuming after
    ``consumed_samples`` samples counted over all DP ranks.

    Each batch: ``"tokens"``, ``"labels"``, ``"position_ids"`` int64 [B, T] and
    ``"loss_mask"`` float32 [B, T], B = ``micro_batch_size``; a weighted blend adds
    ``"dataset_id"`` int16 [B], the blend entry each sample came from. A dataset built with
    ``data.reset_at_eod`` adds ``"cu_seqlens"`` (``collate_documents``).
    """
    if dataset is None:
        return None
    sampler = PretrainingBatchSampler(
        total_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        data_parallel_rank=data_parallel_rank,
        data_parallel_size=data_parallel_size,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_documents if _resets_at_eod(dataset) else None,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


def _resets_at_eod(dataset) -> bool:
    """Whether ``dataset`` (GPTDataset or BlendedDataset) was built with ``data.reset_at_eod``."""
    return bool(getattr(getattr(dataset, "config", None), "reset_position_ids", False))


def collate_documents(samples: list[dict]) -> dict:
    """The default collate plus ``"cu_seqlens"`` int32 [num_docs + 1]: the offsets of the
    documents in the row-major flattened B*T tokens. A document starts where its position is 0:
    at every row start and after every EOD token (GPTDataset's ``reset_position_ids``)."""
    batch = torch.utils.data.default_collate(samples)
    positions = batch["position_ids"].reshape(-1)
    starts = torch.nonzero(positions == 0).flatten()
    batch["cu_seqlens"] = torch.cat([starts, starts.new_tensor([positions.numel()])]).to(torch.int32)
    return batch
