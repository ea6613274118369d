"""Decoding caches: per layer, what generation keeps between tokens (DESIGN section 1).

A ``T`` / ``M`` layer (``MixerCache``) keeps its conv state and, while the sequence is before
its TransPoint p, the attention prefix's un-rotated keys (B), values (x) and processed dt: the
Memory Converter needs exactly these when the token at p - 1 has been processed, and turns them
into the SSM state; from then on the layer holds the conv and SSM states only, whose size does
not depend on the context length. A ``*`` layer (``AttentionCache``) keeps its rotated keys and
values, growing with the context. ``HybridCache`` is the model's list of them.

Buffers are allocated for ``max_seqlen`` tokens when it is known and grow (doubling) when a
sequence goes past it; ``length`` counts the tokens seen. Conv states, keys and values are in
the model's dtype; SSM states and dt in the compute dtype (float32, float64 for a float64 model).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the reference math and of cached SSM states: float64 for a float64 model,
    float32 otherwise (bf16 / fp16 models too)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def append_rows(buffer: Tensor, length: int, new: Tensor) -> Tensor:
    """Write ``new`` [B, n, ...] into rows [length, length + n) of ``buffer`` [B, capacity, ...]
    and return the buffer, reallocated at twice the size (or more) first when it is full."""
    end = length + new.shape[1]
    if end > buffer.shape[1]:
        grown = buffer.new_empty(buffer.shape[0], max(end, 2 * buffer.shape[1]), *buffer.shape[2:])
        grown[:, :length] = buffer[:, :length]
        buffer = grown
    buffer[:, length:end] = new
    return buffer


class _Cache:
    def tensors(self) -> list[Tensor]:
        return [t for t in (getattr(self, f.name) for f in fields(self)) if isinstance(t, Tensor)]

    def nbytes(self) -> int:
        """Bytes of the tensors this layer holds (allocated, not only the rows in use)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def index_select_(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (beam search reordering)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                setattr(self, f.name, value.index_select(0, index.to(value.device)))


@dataclass
class MixerCache(_Cache):
    """A TransMamba / Mamba-2 layer's decoding state.

    conv_state: [B, channels, W-1] the last W-1 inputs of the conv (model dtype).
    ssm_state: [B, H, P, N] the SSM state after the last token (compute dtype); zeros until the
        sequence reaches the TransPoint p, the Memory Converter's state at p.
    keys, values, dts: [B, capacity, G, N], [B, capacity, H, P], [B, capacity, H]: un-rotated
        B, x and processed dt of tokens [0, length) while length < p; None from p on.
    length: tokens seen.
    """

    conv_state: Tensor
    ssm_state: Tensor
    keys: Optional[Tensor] = None
    values: Optional[Tensor] = None
    dts: Optional[Tensor] = None
    length: int = 0

    @property
    def kv_length(self) -> int:
        """Tokens whose keys and values the layer holds (0 from the TransPoint on)."""
        return self.length if self.keys is not None else 0

    def append_prefix(self, keys: Tensor, values: Tensor, dts: Tensor) -> None:
        """Add [B, n, ...] rows at ``length`` (``length`` itself is advanced by the caller)."""
        self.keys = append_rows(self.keys, self.length, keys)
        self.values = append_rows(self.values, self.length, values)
        self.dts = append_rows(self.dts, self.length, dts)

    def release_prefix(self) -> None:
        self.keys = self.values = self.dts = None


@dataclass
class AttentionCache(_Cache):
    """A ``*`` layer's keys (rotated) and values, [B, capacity, groups, dim]; ``length`` rows
    are in use."""

    keys: Tensor
    values: Tensor
    length: int = 0

    @property
    def kv_length(self) -> int:
        return self.length

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Add [B, n, groups, dim] rows; returns every key and value so far, [B, length, ...]."""
        self.keys = append_rows(self.keys, self.length, keys)
        self.values = append_rows(self.values, self.length, values)
        self.length += keys.shape[1]
        return self.keys[:, :self.length], self.values[:, :self.length]


def allocate_attention_cache(batch_size: int, max_seqlen: int, groups: int, dim: int,
                             dtype: torch.dtype, device=None) -> AttentionCache:
    shape = (batch_size, max(1, max_seqlen), groups, dim)
    return AttentionCache(torch.zeros(shape, dtype=dtype, device=device),
                          torch.zeros(shape, dtype=dtype, device=device))


class HybridCache:
    """The model's decoding state: ``layers[i]`` is layer i's ``MixerCache``, ``AttentionCache``
    or None (``-`` layers); ``seen_tokens`` counts the tokens processed. Unpadded rows of one
    length. Also the Hugging Face model's cache (``is_compileable``, ``get_seq_length`` and
    ``reorder_cache`` are what transformers' generate reads)."""

    is_compileable = False

    def __init__(self, layers: list):
        self.layers = list(layers)
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def kv_length(self, layer_idx: int) -> int:
        """Tokens whose keys and values layer ``layer_idx`` still holds."""
        layer = self.layers[layer_idx]
        return 0 if layer is None else layer.kv_length

    def layer_nbytes(self, layer_idx: int) -> int:
        layer = self.layers[layer_idx]
        return 0 if layer is None else layer.nbytes()

    def nbytes(self) -> int:
        return sum(self.layer_nbytes(i) for i in range(len(self.layers)))

    def reorder_cache(self, beam_idx: Tensor) -> "HybridCache":
        for layer in self.layers:
            if layer is not None:
                layer.index_select_(beam_idx)
        return self
