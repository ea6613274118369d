"""Hugging Face configuration of a TransMamba language model (trust_remote_code, no project code).

Written next to the weights by ``megatron_transmamba.hf.export``. ``layer_pattern`` has one symbol
per layer: ``T`` TransMamba mixer, ``M`` Mamba-2 mixer (TransPoint 0), ``*`` self-attention,
``-`` SwiGLU MLP. ``transpoints`` holds the TransPoint of every layer (``null`` for ``*`` / ``-``):
tokens before it use softmax attention, tokens from it on use the SSM.
"""

from transformers import PretrainedConfig


class TransMambaConfig(PretrainedConfig):
    model_type = "transmamba"

    def __init__(self, vocab_size=257, hidden_size=128, layer_pattern="T-T-", transpoints=None,
                 mamba_num_heads=4, mamba_head_dim=32, mamba_num_groups=4, mamba_state_dim=32,
                 mamba_conv_kernel=4, ssd_chunk_size=64, dt_limit=(0.0, None),
                 mixer_position_embedding="rope", rope_theta=10000.0, num_attention_heads=4,
                 num_query_groups=None, kv_channels=None, ffn_hidden_size=None,
                 layernorm_epsilon=1e-5, seq_length=2048, tie_word_embeddings=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.layer_pattern = layer_pattern
        self.transpoints = list(transpoints) if transpoints is not None else [
            0 if s in "TM" else None for s in layer_pattern]
        self.num_hidden_layers = len(layer_pattern)
        self.mamba_num_heads = mamba_num_heads
        self.mamba_head_dim = mamba_head_dim
        self.mamba_num_groups = mamba_num_groups
        self.mamba_state_dim = mamba_state_dim
        self.mamba_conv_kernel = mamba_conv_kernel
        self.ssd_chunk_size = ssd_chunk_size
        self.dt_limit = list(dt_limit)             # [low, high]; high None means no upper limit
        self.mixer_position_embedding = mixer_position_embedding
        self.rope_theta = rope_theta
        self.num_attention_heads = num_attention_heads
        self.num_query_groups = num_query_groups or num_attention_heads
        self.kv_channels = kv_channels or hidden_size // num_attention_heads
        self.ffn_hidden_size = ffn_hidden_size or 4 * hidden_size
        self.layernorm_epsilon = layernorm_epsilon
        self.seq_length = seq_length
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
