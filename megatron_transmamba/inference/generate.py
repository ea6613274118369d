"""Autoregressive generation with our TransMambaLanguageModel (TP = 1) and the hybrid cache.

The cache design is the Hugging Face model's (``hf/remote/modeling_transmamba.py``): a mixer
layer keeps its conv state plus, while the sequence is before its TransPoint p, the prefix's
un-rotated keys (B), values (x) and dt; when the sequence reaches p the Memory Converter
(``layers/memory_converter.py``) turns them into the exact SSM state and they are released, so
the layer's per-token cost stops growing. ``*`` layers keep a growing KV cache. The prompt runs
through the training forward of every layer (so prefill logits are the training logits); the
cache contents come from the same projections. Batches are unpadded prompts of one length.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_transmamba.layers.memory_converter import memory_converter
from megatron_transmamba.layers.rotary import apply_rope, rope_table
from transmamba_kernels.norm.naive import gated_rmsnorm_naive
from transmamba_kernels.ssd.naive import chunk_ssd_naive


class HybridCache:
    """Per-layer dicts: mixer ``conv_state`` and either ``keys``/``values``/``dts`` (before the
    TransPoint) or ``ssm_state``; ``*`` layers rotated ``keys`` and ``values``."""

    def __init__(self, num_layers: int):
        self.layers = [{} for _ in range(num_layers)]
        self.seen_tokens = 0

    def kv_length(self, layer: int) -> int:
        keys = self.layers[layer].get("keys")
        return 0 if keys is None else keys.shape[1]

    def layer_nbytes(self, layer: int) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers[layer].values())


def _mixer_inputs(mixer, normed: Tensor):
    """normed [B, L, d] -> z, pre-conv xBC [B, C, L], dt (raw)."""
    projected = F.linear(normed, mixer.in_proj.weight)
    return torch.split(projected, [mixer.inner, mixer.conv_channels, mixer.heads], dim=-1)


def _split_xbc(mixer, xBC: Tensor, dt: Tensor):
    batch, length = xBC.shape[:2]
    GN = mixer.groups * mixer.state_dim
    x, B, C = torch.split(xBC, [mixer.inner, GN, GN], dim=-1)
    x = x.reshape(batch, length, mixer.heads, mixer.head_dim)
    B = B.reshape(batch, length, mixer.groups, mixer.state_dim)
    C = C.reshape(batch, length, mixer.groups, mixer.state_dim)
    dt = F.softplus(dt.float() + mixer.dt_bias).clamp(*mixer.config.dt_limit)
    return x, B, C, dt


def _mixer_prefill_cache(mixer, normed: Tensor, state: dict) -> None:
    length = normed.shape[1]
    z, xBC, dt = _mixer_inputs(mixer, normed)
    pre = xBC.transpose(1, 2)                                                  # [B, C, L]
    width = mixer.config.mamba_conv_kernel - 1
    state["conv_state"] = F.pad(pre, (max(0, width - length), 0))[..., -width:]
    xBC = F.silu(mixer.conv1d(pre)[..., :length]).transpose(1, 2)
    x, B, C, dt = _split_xbc(mixer, xBC, dt)
    A = -torch.exp(mixer.A_log.to(dt.dtype))
    p = mixer.transpoint
    if length < p:
        state.update(keys=B, values=x, dts=dt)
        return
    initial = memory_converter(B[:, :p], x[:, :p], dt[:, :p], A) if p > 0 else None
    if length == p:
        state["ssm_state"] = initial
        return
    _, final = chunk_ssd_naive(x[:, p:], dt[:, p:], A, B[:, p:], C[:, p:],
                               mixer.config.ssd_chunk_size, D=mixer.D, initial_states=initial,
                               return_final_states=True)
    state["ssm_state"] = final.float()


def _mixer_step(mixer, normed: Tensor, state: dict, position: int) -> Tensor:
    """One token normed [B, 1, d] at ``position``; returns the mixer output [B, 1, d]."""
    batch = normed.shape[0]
    cfg = mixer.config
    z, xBC, dt = _mixer_inputs(mixer, normed)
    window = torch.cat([state["conv_state"], xBC.transpose(1, 2)], dim=-1)     # [B, C, W]
    state["conv_state"] = window[..., 1:]
    conv = (window * mixer.conv1d.weight[:, 0]).sum(-1) + mixer.conv1d.bias
    x, B, C, dt = _split_xbc(mixer, F.silu(conv)[:, None], dt)
    A = -torch.exp(mixer.A_log.to(dt.dtype))
    if "ssm_state" not in state:                                   # attention segment
        keys = state["keys"] = torch.cat([state["keys"], B], dim=1)
        values = state["values"] = torch.cat([state["values"], x], dim=1)
        dts = state["dts"] = torch.cat([state["dts"], dt], dim=1)
        q, k = C, keys
        if cfg.mixer_position_embedding == "rope":
            table = rope_table(position + 1, mixer.state_dim, cfg.rope_theta, normed.device)
            q, k = apply_rope(C, table[position:]), apply_rope(keys, table)
        wide = values.reshape(batch, position + 1, mixer.groups, -1)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), wide.transpose(1, 2),
                                           scale=mixer.softmax_scale)
        y = y.transpose(1, 2).reshape(batch, 1, mixer.inner)
        y = gated_rmsnorm_naive(y, z, mixer.norm_weight, mixer.groups, cfg.layernorm_epsilon, 1)
        if position + 1 == mixer.transpoint:
            state["ssm_state"] = memory_converter(keys, values, dts, A)   # exact; KV released
            for name in ("keys", "values", "dts"):
                del state[name]
        return F.linear(y, mixer.out_proj.weight)
    S = state["ssm_state"]
    rep = mixer.heads // mixer.groups
    x1, dt1 = x[:, 0].float(), dt[:, 0].float()
    B1 = B[:, 0].float().repeat_interleave(rep, dim=1)                            # [B, H, N]
    C1 = C[:, 0].float().repeat_interleave(rep, dim=1)
    S = torch.exp(A * dt1)[..., None, None] * S + (dt1[..., None] * x1)[..., None] * B1[:, :, None]
    state["ssm_state"] = S
    y = torch.einsum("bhpn,bhn->bhp", S, C1) + mixer.D[:, None] * x1
    y = gated_rmsnorm_naive(y.to(x.dtype).reshape(batch, 1, mixer.inner), z, mixer.norm_weight,
                            mixer.groups, cfg.layernorm_epsilon, 0)
    return F.linear(y, mixer.out_proj.weight)


def _qkv(layer, normed: Tensor, config):
    """q [B, L, h, d], k, v [B, L, g, d] of a '*' layer from normed [B, L, d]."""
    from megatron_transmamba.hf.weights import _split_qkv

    batch, length, _ = normed.shape
    dim = config.kv_channels
    q_w, k_w, v_w = _split_qkv(layer.self_attention.linear_qkv.weight, config)
    return (F.linear(normed, q_w).view(batch, length, -1, dim),
            F.linear(normed, k_w).view(batch, length, -1, dim),
            F.linear(normed, v_w).view(batch, length, -1, dim))


def _attention_step(layer, normed: Tensor, state: dict, position: int, config) -> Tensor:
    q, k, v = _qkv(layer, normed, config)
    table = rope_table(position + 1, config.kv_channels, config.rope_theta, normed.device)[position:]
    q, k = apply_rope(q, table), apply_rope(k, table)
    k = state["keys"] = torch.cat([state["keys"], k], dim=1)
    v = state["values"] = torch.cat([state["values"], v], dim=1)
    heads, groups = q.shape[2], k.shape[2]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         scale=1.0 / math.sqrt(config.kv_channels),
                                         enable_gqa=heads != groups)
    out = out.transpose(1, 2).reshape(normed.shape[0], 1, -1)
    return F.linear(out, layer.self_attention.linear_proj.weight)


@torch.no_grad()
def forward_with_cache(model, input_ids: Tensor, cache: HybridCache) -> Tensor:
    """Logits [B, L, V] of ``input_ids`` [B, L] continuing the sequence in ``cache``: the whole
    prompt when the cache is empty, else token by token."""
    if cache.seen_tokens == 0:
        return _prefill(model, input_ids, cache)
    logits = []
    for i in range(input_ids.shape[1]):
        logits.append(_step(model, input_ids[:, i:i + 1], cache))
    return torch.cat(logits, dim=1)


def _prefill(model, input_ids: Tensor, cache: HybridCache) -> Tensor:
    config = model.config
    length = input_ids.shape[1]
    positions = torch.arange(length, device=input_ids.device).unsqueeze(0)
    hidden = model.embedding(input_ids=input_ids, position_ids=positions)             # [S, B, d]
    mixer_rope = (rope_table(length, config.mamba_state_dim, config.rope_theta, input_ids.device)
                  if model.mixer_rope_dim else None)
    attention_rope = (rope_table(length, config.kv_channels, config.rope_theta, input_ids.device)
                      if model.attention_rope_dim else None)
    for index, (symbol, layer) in enumerate(zip(config.layer_pattern, model.layers)):
        state = cache.layers[index]
        if symbol in "TM":
            _mixer_prefill_cache(layer.mixer, layer.norm(hidden).transpose(0, 1), state)
            hidden, _ = layer(hidden, rotary_pos_emb=mixer_rope)
        elif symbol == "*":
            _, k, v = _qkv(layer, layer.input_layernorm(hidden).transpose(0, 1), config)
            table = rope_table(length, config.kv_channels, config.rope_theta, input_ids.device)
            state["keys"], state["values"] = apply_rope(k, table), v
            hidden, _ = layer(hidden, attention_mask=None, rotary_pos_emb=attention_rope)
        else:
            hidden, _ = layer(hidden, attention_mask=None)
    cache.seen_tokens = length
    logits, _ = model.output_layer(model.final_norm(hidden), weight=model.output_weight())
    return logits.transpose(0, 1)


def _step(model, token: Tensor, cache: HybridCache) -> Tensor:
    config = model.config
    position = cache.seen_tokens
    hidden = model.embedding(input_ids=token, position_ids=None).transpose(0, 1)     # [B, 1, d]
    for index, (symbol, layer) in enumerate(zip(config.layer_pattern, model.layers)):
        state = cache.layers[index]
        if symbol in "TM":
            hidden = hidden + _mixer_step(layer.mixer, layer.norm(hidden), state, position)
        elif symbol == "*":
            hidden = hidden + _attention_step(layer, layer.input_layernorm(hidden), state,
                                              position, config)
        else:
            out, _ = layer(hidden.transpose(0, 1), attention_mask=None)
            hidden = out.transpose(0, 1)
    cache.seen_tokens += 1
    logits, _ = model.output_layer(model.final_norm(hidden).transpose(0, 1),
                                   weight=model.output_weight())
    return logits.transpose(0, 1)


@torch.no_grad()
def generate(model, input_ids: Tensor, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_k: Optional[int] = None,
             eos_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
             cache: Optional[HybridCache] = None) -> Tensor:
    """Prompt ``input_ids`` [B, L] followed by up to ``max_new_tokens`` generated tokens.

    Greedy by default; ``do_sample`` draws from softmax(logits / temperature), optionally
    restricted to the ``top_k`` largest. Rows that produced ``eos_token_id`` keep emitting it.
    """
    was_training = model.training
    model.eval()
    cache = cache if cache is not None else HybridCache(len(model.layers))
    logits = forward_with_cache(model, input_ids, cache)[:, -1].float()
    tokens, done = [input_ids], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        if do_sample:
            scores = logits / temperature
            if top_k:
                kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
                scores = scores.masked_fill(scores < kth, -math.inf)
            next_token = torch.multinomial(F.softmax(scores, dim=-1), 1, generator=generator)[:, 0]
        else:
            next_token = logits.argmax(-1)
        if eos_token_id is not None:
            next_token = torch.where(done, torch.full_like(next_token, eos_token_id), next_token)
            done |= next_token == eos_token_id
        tokens.append(next_token[:, None])
        if step + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
            break
        logits = forward_with_cache(model, next_token[:, None], cache)[:, -1].float()
    model.train(was_training)
    return torch.cat(tokens, dim=1)
