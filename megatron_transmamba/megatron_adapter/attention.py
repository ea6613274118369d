"""megatron-core's selective recomputation of core attention, for our fused-RoPE SelfAttention
(inventory: ``selective_recompute_core_attention``)."""

from __future__ import annotations


def checkpointed_core_attention(attention, query, key, value, attention_mask, attn_mask_type,
                                packed_seq_params=None):
    """``attention.core_attention(query, key, value, ...)`` [S, B, heads, d] -> [S, B, h*d] under
    megatron-core's activation checkpoint (``Attention._checkpointed_attention_forward``,
    private in megatron-core 0.16): the core attention runs again in backward."""
    return attention._checkpointed_attention_forward(
        query, key, value, attention_mask, attn_mask_type=attn_mask_type,
        packed_seq_params=packed_seq_params)
