"""How a TransMamba parameter made of several components is split across tensor-parallel ranks.

The mixer's ``in_proj`` rows are the components ``[z | x | B | C | dt]`` (sizes H·P, H·P,
G·N, G·N, H) and its conv channels ``[x | B | C]``. Under tensor parallelism rank r keeps the
r-th of tp equal chunks of every component, so its local rows are
``[z_r | x_r | B_r | C_r | dt_r]`` (megatron-core's Mamba layout, DESIGN section 4), not a
contiguous slice of the full matrix. Two helpers follow that rule:

- ``local_components``: this rank's part of a full (TP = 1) tensor, used to initialise the
  mixer the same way whatever the TP size;
- ``split_sharded_tensor``: a dist_checkpointing factory that stores each component as its own
  sharded tensor (``<key>.z``, ``<key>.x``, ...), so a checkpoint saved at one TP size loads at
  another (the pattern of megatron-core's ``ssm/mamba_mixer.py``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import torch
from megatron.core.dist_checkpointing.mapping import (ReplicaId, ShardedTensor,
                                                      ShardedTensorFactory)
from torch import Tensor


def local_components(full: Tensor, sections: Sequence[int], rank: int, size: int,
                     dim: int = 0) -> Tensor:
    """Rank ``rank``'s part of ``full``, whose ``dim`` is the concatenation of components of
    the full sizes ``sections``: the rank's chunk of each component, concatenated."""
    if sum(sections) != full.shape[dim]:
        raise ValueError(f"component sizes {list(sections)} do not cover dim {dim} of a tensor "
                         f"of shape {tuple(full.shape)}")
    parts = []
    for part in torch.split(full, list(sections), dim=dim):
        if part.shape[dim] % size:
            raise ValueError(f"a component of size {part.shape[dim]} does not split over "
                             f"{size} tensor-parallel ranks")
        parts.append(part.chunk(size, dim=dim)[rank])
    return torch.cat(parts, dim=dim)


def split_sharded_tensor(sharded: ShardedTensor, local_sections: Sequence[int],
                         names: Sequence[str]) -> ShardedTensorFactory:
    """Replace one tensor-parallel ``ShardedTensor`` whose local dim 0 holds the components
    ``names`` (local sizes ``local_sections``) by one sharded tensor per component, keyed
    ``<key>.<name>``; loading concatenates them back into the local tensor."""
    template = sharded.without_data()
    if sum(local_sections) != template.local_shape[0] or len(local_sections) != len(names):
        raise ValueError(f"{sharded.key}: components {dict(zip(names, local_sections))} do not "
                         f"cover local dim 0 of shape {template.local_shape}")

    @torch.no_grad()
    def build(key: str, data: Tensor, replica_id: ReplicaId, flattened_range: Optional[slice]):
        whole = replace(template, key=key, data=data, dtype=data.dtype, replica_id=replica_id,
                        flattened_range=flattened_range)
        pieces, start = [], 0
        for length, name in zip(local_sections, names):
            for piece in whole.narrow(0, start, length):
                piece.key = f"{piece.key}.{name}"
                pieces.append(piece)
            start += length
        return pieces

    @torch.no_grad()
    def merge(pieces):
        return torch.cat(pieces)

    return ShardedTensorFactory(sharded.key, sharded.data, build, merge, sharded.replica_id)
