"""TransMamba causal LM for Hugging Face transformers (trust_remote_code; plain PyTorch only).

TransMamba (arXiv 2503.24067): one mixer whose projections serve both softmax attention
(Q = C, K = B, V = x, RoPE on Q and K) and Mamba-2. Tokens before a layer's TransPoint p use
attention; the Memory Converter turns the prefix's K = B, V = x and dt into the exact SSM state
after token p - 1 (S = sum_s exp(A sum_{r>s} dt_r) dt_s x_s B_s^T) and the SSM runs on from there.
Attention tokens are normalised without the z gate, SSM tokens with it.

The math is not written here: ``attention``, ``cache``, ``conv``, ``memory_converter``,
``mixer``, ``norm``, ``rope`` and ``ssd`` beside this file are copies of
``transmamba_kernels.reference`` (megatron_transmamba's torch reference, which its training
model and its own generation run), copied verbatim by the export. This file holds the
``nn.Module`` shell, the Hugging Face weight names and generation. The cache
(``TransMambaHybridCache``, the reference ``HybridCache``) holds, per mixer layer, the conv state
and either the prefix's keys (un-rotated B), values (x) and dt while the sequence is before p,
or the SSM state once it has reached p: at that moment the Memory Converter builds the state
and the keys and values are released, so the layer's decoding cost and memory stop growing.
``*`` layers keep an ordinary growing KV cache. Generation assumes unpadded prompts of one
length per batch.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .attention import cached_attention, causal_attention
from .cache import HybridCache, allocate_attention_cache
from .configuration_transmamba import TransMambaConfig
from .mixer import MixerShape, MixerWeights, allocate_mixer_cache, mixer_forward, mixer_step
from .norm import rmsnorm_naive
from .rope import apply_rope, rope_angles

TransMambaHybridCache = HybridCache


class TransMambaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x):
        return rmsnorm_naive(x, self.weight, self.eps)


class TransMambaMixer(nn.Module):
    """The TransMamba token mixer with TransPoint ``transpoint`` (0 = Mamba-2)."""

    def __init__(self, config, transpoint):
        super().__init__()
        low, high = config.dt_limit
        self.shape = MixerShape(
            heads=config.mamba_num_heads, head_dim=config.mamba_head_dim,
            groups=config.mamba_num_groups, state_dim=config.mamba_state_dim,
            conv_kernel=config.mamba_conv_kernel, chunk_size=config.ssd_chunk_size,
            transpoint=int(transpoint), eps=config.layernorm_epsilon,
            dt_limit=(low, math.inf if high is None else high),
            rope_theta=config.rope_theta if config.mixer_position_embedding == "rope" else None)
        H, channels = self.shape.heads, self.shape.conv_channels
        self.in_proj = nn.Linear(config.hidden_size, self.shape.inner + channels + H, bias=False)
        self.conv1d = nn.Conv1d(channels, channels, self.shape.conv_kernel, groups=channels,
                                padding=self.shape.conv_kernel - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.A_log = nn.Parameter(torch.zeros(H))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = TransMambaRMSNorm(self.shape.inner, self.shape.eps)   # its weight only
        self.out_proj = nn.Linear(self.shape.inner, config.hidden_size, bias=False)

    def weights(self):
        return MixerWeights(self.conv1d.weight, self.conv1d.bias, self.dt_bias, self.A_log,
                            self.D, self.norm.weight)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype):
        return allocate_mixer_cache(self.shape, batch_size, max_seqlen, dtype,
                                    self.in_proj.weight.device)

    def forward(self, hidden, cache=None):
        """hidden [B, L, d]. ``cache``: this layer's ``MixerCache`` or None; an empty one is
        filled by the prefill, a filled one advances one token at a time."""
        if cache is None or cache.length == 0:
            return self.out_proj(mixer_forward(self.in_proj(hidden), self.shape, self.weights(),
                                               cache))
        steps = [mixer_step(self.in_proj(hidden[:, i]), self.shape, self.weights(), cache)
                 for i in range(hidden.shape[1])]
        return self.out_proj(torch.stack(steps, dim=1))


class TransMambaAttention(nn.Module):
    """Standard causal (grouped-query) self-attention with RoPE, for ``*`` layers."""

    def __init__(self, config):
        super().__init__()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_query_groups
        self.head_dim = config.kv_channels
        self.rope_theta = config.rope_theta
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype):
        return allocate_attention_cache(batch_size, max_seqlen, self.kv_heads, self.head_dim,
                                        dtype, self.q_proj.weight.device)

    def forward(self, hidden, cache=None):
        batch, length, _ = hidden.shape
        q = self.q_proj(hidden).view(batch, length, self.heads, self.head_dim)
        k = self.k_proj(hidden).view(batch, length, self.kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(batch, length, self.kv_heads, self.head_dim)
        start = 0 if cache is None else cache.length
        angles = rope_angles(torch.arange(start, start + length, device=hidden.device),
                             self.head_dim, self.rope_theta)
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        scale = 1.0 / math.sqrt(self.head_dim)
        out = (causal_attention(q, k, v, scale) if cache is None
               else cached_attention(q, k, v, cache, scale))
        return self.o_proj(out.reshape(batch, length, -1))


class TransMambaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden, cache=None):
        return self.down_proj(F.silu(self.gate_proj(hidden)) * self.up_proj(hidden))


class TransMambaBlock(nn.Module):
    """Pre-norm residual block: hidden + op(RMSNorm(hidden))."""

    def __init__(self, config, symbol, transpoint):
        super().__init__()
        self.symbol = symbol
        self.norm = TransMambaRMSNorm(config.hidden_size, config.layernorm_epsilon)
        if symbol in "TM":
            self.mixer = TransMambaMixer(config, transpoint)
        elif symbol == "*":
            self.attention = TransMambaAttention(config)
        else:
            self.mlp = TransMambaMLP(config)

    def op(self):
        return self.mixer if self.symbol in "TM" else self.attention if self.symbol == "*" else self.mlp

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype):
        if self.symbol == "-":
            return None
        return self.op().allocate_inference_cache(batch_size, max_seqlen, dtype)

    def forward(self, hidden, cache):
        return hidden + self.op()(self.norm(hidden), cache)


@dataclass
class TransMambaCausalLMOutput(ModelOutput):
    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    cache: Optional[TransMambaHybridCache] = None


class TransMambaPreTrainedModel(PreTrainedModel):
    config_class = TransMambaConfig
    base_model_prefix = "model"
    _no_split_modules = ["TransMambaBlock"]
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False                       # the hybrid cache is built by the model itself

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)


class TransMambaModel(TransMambaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransMambaBlock(config, s, p)
                                    for s, p in zip(config.layer_pattern, config.transpoints))
        self.norm = TransMambaRMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.post_init()

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None):
        """An empty ``TransMambaHybridCache`` (it grows past ``max_seqlen`` tokens)."""
        dtype = dtype or self.embed_tokens.weight.dtype
        return TransMambaHybridCache([layer.allocate_inference_cache(batch_size, max_seqlen, dtype)
                                      for layer in self.layers])

    def forward(self, input_ids, cache: Optional[TransMambaHybridCache] = None):
        hidden = self.embed_tokens(input_ids)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, None if cache is None else cache.layers[index])
        if cache is not None:
            cache.seen_tokens += input_ids.shape[1]
        return self.norm(hidden)


class TransMambaForCausalLM(TransMambaPreTrainedModel, GenerationMixin):
    # with config.tie_word_embeddings the LM head is the embedding matrix (saved once)
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = TransMambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None,
                                      attention_mask=None, use_cache=True, **kwargs):
        cache = cache if cache is not None else past_key_values
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("TransMamba generation takes unpadded prompts of one length per batch")
        if cache is not None and cache.seen_tokens:
            input_ids = input_ids[:, cache.seen_tokens:]
        elif use_cache:
            cache = self.model.allocate_inference_cache(*input_ids.shape)
        return {"input_ids": input_ids, "cache": cache, "use_cache": use_cache}

    def forward(self, input_ids, cache=None, past_key_values=None, labels=None, use_cache=None,
                attention_mask=None, logits_to_keep=0, return_dict=None, **kwargs):
        """input_ids [B, L]; returns logits [B, L, V] (float32 loss when labels are given)."""
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = self.model.allocate_inference_cache(*input_ids.shape)
        hidden = self.model(input_ids, cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1))
        return TransMambaCausalLMOutput(loss=loss, logits=logits, cache=cache)
