"""megatron-core's dataset builder, runnable without torch.distributed for weighted blends."""

from __future__ import annotations

import copy

import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder


class DatasetBuilder(BlendedMegatronDatasetBuilder):
    """``BlendedMegatronDatasetBuilder`` whose ``BlendedDataset`` builds its blending indices in
    memory when there is no process group (inventory: ``blended_dataset_without_process_group``)."""

    @staticmethod
    def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
        if cls is BlendedDataset and not torch.distributed.is_initialized():
            # BlendedDataset calls torch.distributed.get_rank() on an index-cache miss, which
            # raises without a process group; uncached, it builds its (cheap) blending indices
            # in memory instead. The mid-level GPTDatasets keep their cache.
            *rest, config = args
            config = copy.copy(config)
            config.path_to_cache = None
            args = (*rest, config)
        return BlendedMegatronDatasetBuilder.build_generic_dataset(
            cls, is_built_on_rank, synchronize_ranks, *args
        )
