"""Core attention for the ``*`` layers through PyTorch SDPA.

megatron-core's local ``DotProductAttention`` materialises the T x T score matrix, which would
make the Transformer baseline unfairly slow and memory-hungry; this module has the same
constructor and forward signature and calls ``F.scaled_dot_product_attention`` (flash / cuDNN /
memory-efficient kernels on GPU); every ``*`` layer uses it (``models/specs.py``). With packed documents (``PackedDocuments`` as ``packed_seq_params``) it is
causal inside each document (``document_attention``: a few padded SDPA calls, exact). Under
context parallelism (the CP group of megatron-core's ``pg_collection.cp`` has R > 1 ranks) each
rank holds a contiguous shard [r S, (r + 1) S) of the sequence, its Q and K already rotated at
those global positions (the model passes the RoPE table rows [r S, (r + 1) S) as
``rotary_pos_emb``), and computes its rows of full causal attention through
``parallel/context_parallel_attention.context_parallel_causal_attention`` (an all-gather of K
and V); with packed documents (this rank's ``PackedDocuments.shard``, Q and K rotated at
in-document positions) it is causal inside each document, whose earlier part may live on
earlier ranks (``parallel/context_parallel_documents.context_parallel_document_attention``).

Decoding (``SelfAttentionFusedRope``: ``allocate_inference_cache``, ``forward(...,
inference_cache=cache)`` as the prefill, ``step``): the layer's own projections and RoPE, a KV
cache and ``transmamba_kernels.reference.attention.cached_attention`` for each new token.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_pg_size
from torch import Tensor

from megatron_transmamba.layers.packed_documents import PackedDocuments, document_attention
from megatron_transmamba.megatron_adapter.attention import checkpointed_core_attention
from transmamba_kernels.reference.attention import cached_attention
from transmamba_kernels.reference.cache import AttentionCache, allocate_attention_cache
from transmamba_kernels.reference.rope import rope_angles
from megatron_transmamba.parallel.context_parallel_attention import (
    context_parallel_causal_attention)
from megatron_transmamba.parallel.context_parallel_documents import (
    context_parallel_document_attention)


class SDPAttention(MegatronModule):
    """Causal multi-head / grouped-query attention on megatron layouts [S, B, heads, dim].

    ``pg_collection``: megatron-core's ``ProcessGroupCollection`` (SelfAttention passes its own);
    only ``cp`` is read, and its size must equal ``config.context_parallel_size``.
    ``cp_comm_type`` is accepted for megatron-core's signature and ignored (one all-gather).
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"SDPAttention supports causal masks only, got {attn_mask_type}")
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.cp_group = getattr(pg_collection, "cp", None)
        self.cp_size = get_pg_size(self.cp_group)
        if self.cp_size != config.context_parallel_size:
            raise ValueError(f"context_parallel_size={config.context_parallel_size} but the CP "
                             f"group has {self.cp_size} rank(s): pass megatron-core's "
                             "pg_collection with its cp group")
        if self.cp_size > 1 and self.dropout > 0:
            # every CP rank draws from the same seed, so shards would share dropout patterns
            raise ValueError(f"attention_dropout={self.dropout} with context_parallel_size="
                             f"{self.cp_size}: attention dropout is not supported under context "
                             "parallelism, set attention_dropout: 0")

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None) -> Tensor:
        """query [S, B, h, d], key/value [S, B, g, d] with h % g == 0 -> [S, B, h*d]."""
        if attention_bias is not None or (packed_seq_params is not None
                                          and not isinstance(packed_seq_params, PackedDocuments)):
            raise NotImplementedError("SDPAttention: attention bias and THD packed sequences "
                                      "are not supported (packed documents are PackedDocuments)")
        seq_len, batch, heads, dim = query.shape
        if self.cp_size > 1:
            if key.shape[0] != seq_len:
                raise NotImplementedError("SDPAttention: a key/value cache (inference) with "
                                          "context parallelism is not supported")
            q, k, v = (t.transpose(0, 1) for t in (query, key, value))    # [B, S, heads, d]
            if packed_seq_params is not None:
                out = context_parallel_document_attention(q, k, v, packed_seq_params,
                                                          self.softmax_scale, self.cp_group)
            else:
                out = context_parallel_causal_attention(q, k, v, self.cp_size * seq_len,
                                                        self.softmax_scale, self.cp_group)
            return out.transpose(0, 1).reshape(seq_len, batch, heads * dim)
        dropout = self.dropout if self.training else 0.0
        if packed_seq_params is None:
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [B, heads, S, d]
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.softmax_scale, dropout_p=dropout,
                enable_gqa=k.shape[1] != heads)
            return out.permute(2, 0, 1, 3).reshape(seq_len, batch, heads * dim)

        def attend(q, k, v):                                # [documents, length, heads, d]
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                scale=self.softmax_scale, dropout_p=dropout, enable_gqa=k.shape[2] != heads)
            return out.transpose(1, 2)

        out = document_attention(*(t.transpose(0, 1) for t in (query, key, value)),
                                 packed_seq_params, attend)                 # [B, S, h, d]
        return out.transpose(0, 1).reshape(seq_len, batch, heads * dim)


class SelfAttentionFusedRope(SelfAttention):
    """megatron-core ``SelfAttention`` whose training forward rotates Q and K in one fused kernel.

    Without Transformer Engine or apex, megatron-core's RoPE recomputes cos and sin and runs
    about ten kernels per tensor, forward and again backward. Under ``mixer_backend: triton``
    this forward runs the fused QKV projection, ``rope_qk_triton`` (both tensors, one kernel each
    way, reading the projection's views in place; the table may be per document,
    [S, B, 1, dim]), the core attention and the output projection. Everything else (inference,
    output gates, partial or interleaved RoPE) is megatron-core's own forward. Neither path does
    anything context-parallel: under CP ``rotary_pos_emb`` is this shard's rows of the global
    table, or with packed documents the table of each token's in-document position
    (megatron-core's bshd ``apply_rotary_pos_emb`` reads its cp_group only for THD input), and
    the core attention gathers the keys and values.
    """

    def __init__(self, config, submodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.fused_rope = None
        if (getattr(config, "mixer_backend", "torch") == "triton"
                and not config.rotary_interleaved and not config.attention_output_gate):
            from transmamba_kernels.rope.rope_qk import rope_qk_triton

            self.fused_rope = rope_qk_triton

    def _rotate(self, query: Tensor, key: Tensor, table: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE of query, key [S, B, heads, d] by table rows 0..S-1, as the training forward
        does it (the fused kernel, or megatron-core's ``apply_rotary_pos_emb``)."""
        if self.fused_rope is not None:
            return self.fused_rope(query, key, table, seq_first=True)
        return tuple(apply_rotary_pos_emb(t, table[:t.shape[0]], config=self.config,
                                          cp_group=self.pg_collection.cp) for t in (query, key))

    def _check_decoding(self) -> None:
        if (get_pg_size(self.pg_collection.tp) != 1 or get_pg_size(self.pg_collection.cp) != 1
                or self.config.attention_output_gate or self.config.rotary_interleaved):
            raise NotImplementedError("decoding runs '*' layers at tensor- and context-parallel "
                                      "size 1, without output gates or interleaved RoPE")

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int,
                                 dtype: Optional[torch.dtype] = None) -> AttentionCache:
        """An empty KV cache for ``max_seqlen`` tokens (it grows past that)."""
        self._check_decoding()
        weight = self.linear_qkv.weight
        return allocate_attention_cache(batch_size, max_seqlen,
                                        self.num_query_groups_per_partition,
                                        self.hidden_size_per_attention_head,
                                        dtype or weight.dtype, weight.device)

    def _prefill(self, hidden_states: Tensor, rotary_pos_emb: Tensor,
                 cache: AttentionCache) -> tuple[Tensor, Optional[Tensor]]:
        """The training forward of a prompt [S, B, d] that also stores its rotated keys and
        values in the empty ``cache``."""
        self._check_decoding()
        if cache.length:
            raise ValueError(f"prefill into a cache holding {cache.length} tokens; use step")
        query, key, value = self.get_query_key_value_tensors(hidden_states)  # [S, B, heads, d]
        query, key = self._rotate(query, key, rotary_pos_emb)
        cache.append(key.transpose(0, 1), value.transpose(0, 1))
        out = self.core_attention(query, key, value, None, attn_mask_type=self.attn_mask_type)
        return self.linear_proj(out)

    def step(self, hidden_states: Tensor, cache: AttentionCache) -> tuple[Tensor, Optional[Tensor]]:
        """One token [1, B, d] at position ``cache.length``: its query over every cached key
        and value (``reference.attention.cached_attention``). Returns linear_proj's (out, bias)."""
        query, key, value = self.get_query_key_value_tensors(hidden_states)   # [1, B, heads, d]
        position = torch.tensor([cache.length], device=hidden_states.device)
        table = rope_angles(position, self.hidden_size_per_attention_head, self.config.rope_theta)
        query, key = self._rotate(query, key, table)
        out = cached_attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                               cache, self.core_attention.softmax_scale)      # [B, 1, heads, d]
        return self.linear_proj(out.reshape(1, out.shape[0], -1))

    def forward(self, hidden_states, attention_mask=None, key_value_states=None,
                inference_context=None, rotary_pos_emb=None, packed_seq_params=None,
                inference_cache: Optional[AttentionCache] = None, **kwargs):
        """megatron-core's forward; ``inference_cache`` (an empty ``allocate_inference_cache``)
        makes it the prefill, which also keeps the prompt's keys and values for ``step``."""
        if inference_cache is not None:
            return self._prefill(hidden_states, rotary_pos_emb, inference_cache)
        plain = (self.fused_rope is None or inference_context is not None
                 or kwargs.get("inference_params") is not None or key_value_states is not None
                 or not isinstance(rotary_pos_emb, Tensor)
                 or rotary_pos_emb.shape[-1] != self.hidden_size_per_attention_head)
        if plain:
            return super().forward(hidden_states, attention_mask, key_value_states=key_value_states,
                                   inference_context=inference_context,
                                   rotary_pos_emb=rotary_pos_emb,
                                   packed_seq_params=packed_seq_params, **kwargs)
        query, key, value = self.get_query_key_value_tensors(hidden_states)   # [S, B, heads, d]
        query, key = self.fused_rope(query, key, rotary_pos_emb, seq_first=True)
        if self.checkpoint_core_attention and self.training:
            out = checkpointed_core_attention(self, query, key, value, attention_mask,
                                              self.attn_mask_type, packed_seq_params)
        else:
            out = self.core_attention(query, key, value, attention_mask,
                                      attn_mask_type=self.attn_mask_type,
                                      packed_seq_params=packed_seq_params)      # [S, B, h*d]
        return self.linear_proj(out)
