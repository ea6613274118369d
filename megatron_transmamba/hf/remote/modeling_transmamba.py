"""TransMamba causal LM for Hugging Face transformers (trust_remote_code; plain PyTorch only).

TransMamba (arXiv 2503.24067): one mixer whose projections serve both softmax attention
(Q = C, K = B, V = x, RoPE on Q and K) and Mamba-2. Tokens before a layer's TransPoint p use
attention; the Memory Converter turns the prefix's K = B, V = x and dt into the exact SSM state
after token p - 1 (S = sum_s exp(A sum_{r>s} dt_r) dt_s x_s B_s^T) and the SSM runs on from there.
Attention tokens are normalised without the z gate, SSM tokens with it.

``TransMambaHybridCache`` holds, per mixer layer, the conv state and either the prefix's keys
(un-rotated B), values (x) and dt while the sequence is before p, or the SSM state once it has
reached p: at that moment the Memory Converter builds the state and the keys and values are
released, so the layer's decoding cost and memory stop growing. ``*`` layers keep an ordinary
growing KV cache. Generation assumes unpadded prompts of one length per batch.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

try:
    from .configuration_transmamba import TransMambaConfig
except ImportError:                      # loaded as a plain module (tests, scripts)
    from configuration_transmamba import TransMambaConfig



def rope_angles(positions, dim, theta):
    """Angles [T, dim] (halves duplicated, rotate-half convention) for integer positions [T]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                            device=positions.device) / dim)
    angles = torch.outer(positions.to(torch.float32), inv_freq)
    return torch.cat([angles, angles], dim=-1)


def apply_rope(t, angles):
    """Rotate t [B, T, heads, dim] by angles [T, dim]."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    cos, sin = angles.cos()[None, :, None, :].to(acc), angles.sin()[None, :, None, :].to(acc)
    t_acc = t.to(acc)
    half = t.shape[-1] // 2
    rotated = torch.cat([-t_acc[..., half:], t_acc[..., :half]], dim=-1)
    return (t_acc * cos + rotated * sin).to(t.dtype)


def memory_converter(k, v, dt, A):
    """SSM state [B, H, P, N] after the prefix from k [B, p, G, N] (un-rotated B), v [B, p, H, P]
    (x), dt [B, p, H] and A [H]: exactly the Mamba-2 recurrence's state after token p - 1."""
    heads, groups = v.shape[2], k.shape[2]
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    dt = dt.to(acc)
    after = torch.flip(torch.cumsum(torch.flip(dt, [1]), dim=1), [1]) - dt       # [B, p, H]
    weight = torch.exp(after * A.to(acc)) * dt
    k_heads = k.to(acc).repeat_interleave(heads // groups, dim=2)                   # [B, p, H, N]
    return torch.einsum("bsh,bshp,bshn->bhpn", weight, v.to(acc), k_heads)


def _segsum(x):
    """x [..., L] -> [..., L, L] with out[i, j] = sum_{j < r <= i} x[r] (-inf above the diagonal)."""
    length = x.shape[-1]
    x = x[..., None].expand(*x.shape, length)
    below = torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device), -1)
    x = torch.cumsum(x.masked_fill(~below, 0), dim=-2)
    keep = torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device), 0)
    return x.masked_fill(~keep, -torch.inf)


def ssd_scan(x, dt, A, B, C, chunk_size, initial_state=None):
    """Chunked Mamba-2 SSD (Dao & Gu 2024, section 6) in float32 (float64 for float64 x).

    x [b, T, H, P], dt [b, T, H], A [H], B/C [b, T, G, N], initial_state [b, H, P, N].
    Returns y [b, T, H, P] (without the D skip) and the state after the last token.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch, length, heads, head_dim = x.shape
    groups = B.shape[2]
    pad = (-length) % chunk_size
    # Zero-padded tokens have dt = 0: no decay and no input, so the final state is unchanged.
    x, dt, B, C = (F.pad(t.to(acc), (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    B = B.repeat_interleave(heads // groups, dim=2)
    C = C.repeat_interleave(heads // groups, dim=2)
    chunks = x.shape[1] // chunk_size
    X = (x * dt[..., None]).reshape(batch, chunks, chunk_size, heads, head_dim)
    Adt = (dt * A.to(acc)).reshape(batch, chunks, chunk_size, heads).permute(0, 3, 1, 2)
    B = B.reshape(batch, chunks, chunk_size, heads, -1)
    C = C.reshape(batch, chunks, chunk_size, heads, -1)
    A_cumsum = torch.cumsum(Adt, dim=-1)                                         # [b, H, c, l]
    L = torch.exp(_segsum(Adt))
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, X)
    decay_states = torch.exp(A_cumsum[..., -1:] - A_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)
    if initial_state is None:
        initial_state = torch.zeros_like(states[:, 0])
    states = torch.cat([initial_state.to(acc)[:, None], states], dim=1)
    decay_chunk = torch.exp(_segsum(F.pad(A_cumsum[..., -1], (1, 0))))
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = states[:, :-1], states[:, -1]
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(A_cumsum))
    y = (y_diag + y_off).reshape(batch, chunks * chunk_size, heads, head_dim)[:, :length]
    return y, final_state


def grouped_rmsnorm(y, z, weight, groups, eps):
    """RMSNorm over G groups of channels of y [B, T, C], gated by SiLU(z) first when z is given."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    h = y.to(acc)
    if z is not None:
        h = h * F.silu(z.to(acc))
    batch, length, width = h.shape
    h = h.view(batch, length, groups, width // groups)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h.view(batch, length, width) * weight.to(acc)).to(y.dtype)



class TransMambaHybridCache:
    """Per-layer generation state. Mixer layers: ``conv_state`` [B, channels, W - 1] and, before
    the TransPoint, ``keys`` [B, t, G, N] (un-rotated), ``values`` [B, t, H, P], ``dts`` [B, t, H];
    from the TransPoint on, ``ssm_state`` [B, H, P, N] only. ``*`` layers: rotated ``keys`` and
    ``values`` [B, t, groups, dim]."""

    is_compileable = False

    def __init__(self, config):
        self.layers = [{} for _ in config.layer_pattern]
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def kv_length(self, layer_idx: int) -> int:
        """Tokens whose keys and values the layer still holds."""
        keys = self.layers[layer_idx].get("keys")
        return 0 if keys is None else keys.shape[1]

    def layer_nbytes(self, layer_idx: int) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers[layer_idx].values()
                   if isinstance(t, torch.Tensor))

    def reorder_cache(self, beam_idx):
        for layer in self.layers:
            for name, t in list(layer.items()):
                if isinstance(t, torch.Tensor):
                    layer[name] = t.index_select(0, beam_idx.to(t.device))
        return self



class TransMambaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        h = x.to(acc)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.to(acc)).to(x.dtype)


class TransMambaMixer(nn.Module):
    """The TransMamba token mixer with TransPoint ``transpoint`` (0 = Mamba-2)."""

    def __init__(self, config, transpoint):
        super().__init__()
        self.transpoint = int(transpoint)
        H, P, G, N = (config.mamba_num_heads, config.mamba_head_dim, config.mamba_num_groups,
                      config.mamba_state_dim)
        self.heads, self.head_dim, self.groups, self.state_dim = H, P, G, N
        self.inner, self.conv_channels = H * P, H * P + 2 * G * N
        self.conv_kernel = config.mamba_conv_kernel
        self.chunk_size = config.ssd_chunk_size
        self.eps = config.layernorm_epsilon
        low, high = config.dt_limit
        self.dt_limit = (low, math.inf if high is None else high)
        self.use_rope = config.mixer_position_embedding == "rope"
        self.rope_theta = config.rope_theta
        self.softmax_scale = 1.0 / math.sqrt(N)
        self.in_proj = nn.Linear(config.hidden_size, 2 * H * P + 2 * G * N + H, bias=False)
        self.conv1d = nn.Conv1d(self.conv_channels, self.conv_channels, self.conv_kernel,
                                groups=self.conv_channels, padding=self.conv_kernel - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.A_log = nn.Parameter(torch.zeros(H))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = TransMambaRMSNorm(H * P, self.eps)
        self.out_proj = nn.Linear(H * P, config.hidden_size, bias=False)

    def _rope(self, t, start):
        if not self.use_rope:
            return t
        positions = torch.arange(start, start + t.shape[1], device=t.device)
        return apply_rope(t, rope_angles(positions, self.state_dim, self.rope_theta))

    def _split(self, xBC, dt):
        batch, length = xBC.shape[:2]
        GN = self.groups * self.state_dim
        x, B, C = torch.split(xBC, [self.inner, GN, GN], dim=-1)
        x = x.reshape(batch, length, self.heads, self.head_dim)
        B = B.reshape(batch, length, self.groups, self.state_dim)
        C = C.reshape(batch, length, self.groups, self.state_dim)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit)
        if x.dtype == torch.float64:
            dt = dt.double()
        return x, B, C, dt

    def _attend(self, q, k, v):
        """Causal grouped attention: q [B, Tq, G, N] at the last Tq of k's positions,
        k [B, Tk, G, N], v [B, Tk, H, P]; one Q/K group serves H/G value heads."""
        batch, tq = q.shape[:2]
        tk = k.shape[1]
        wide = v.reshape(batch, tk, self.groups, -1)
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             wide.transpose(1, 2), attn_mask=mask,
                                             scale=self.softmax_scale)
        return out.transpose(1, 2).reshape(batch, tq, self.heads, self.head_dim)

    def forward(self, hidden, state: Optional[dict]):
        """hidden [B, L, d]. ``state``: this layer's cache dict (filled in) or None."""
        if state and "conv_state" in state:
            outs = [self._step(hidden[:, i:i + 1], state) for i in range(hidden.shape[1])]
            return torch.cat(outs, dim=1)
        return self._prefill(hidden, state)

    def _prefill(self, hidden, state):
        batch, length, _ = hidden.shape
        z, xBC, dt = torch.split(self.in_proj(hidden), [self.inner, self.conv_channels, self.heads], -1)
        pre_conv = xBC.transpose(1, 2)                                         # [B, C, L]
        xBC = F.silu(self.conv1d(pre_conv)[..., :length]).transpose(1, 2)
        x, B, C, dt = self._split(xBC, dt)
        A = -torch.exp(self.A_log.to(dt.dtype))
        p = min(self.transpoint, length)
        ys, state_at_p = [], None
        if p > 0:
            ys.append(grouped_rmsnorm(self._attend(self._rope(C[:, :p], 0), self._rope(B[:, :p], 0),
                                                   x[:, :p]).reshape(batch, p, self.inner),
                                      None, self.norm.weight, self.groups, self.eps))
            if p < length or (state is not None and p == self.transpoint):
                state_at_p = memory_converter(B[:, :p], x[:, :p], dt[:, :p], A)
        final = state_at_p
        if p < length:
            y, final = ssd_scan(x[:, p:], dt[:, p:], A, B[:, p:], C[:, p:], self.chunk_size, state_at_p)
            y = (y + x[:, p:].to(y.dtype) * self.D.to(y.dtype)[:, None]).to(x.dtype)
            ys.append(grouped_rmsnorm(y.reshape(batch, length - p, self.inner), z[:, p:],
                                      self.norm.weight, self.groups, self.eps))
        if state is not None:
            width = self.conv_kernel - 1
            state["conv_state"] = F.pad(pre_conv, (max(0, width - length), 0))[..., -width:]
            if length < self.transpoint:
                state.update(keys=B, values=x, dts=dt)
            else:
                state["ssm_state"] = final
        return self.out_proj(torch.cat(ys, dim=1))

    def _step(self, hidden, state):
        """One token [B, 1, d] at position t = the number of tokens already in ``state``."""
        batch = hidden.shape[0]
        z, xBC, dt = torch.split(self.in_proj(hidden), [self.inner, self.conv_channels, self.heads], -1)
        window = torch.cat([state["conv_state"], xBC.transpose(1, 2)], dim=-1)    # [B, C, W]
        state["conv_state"] = window[..., 1:]
        conv = (window * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias
        x, B, C, dt = self._split(F.silu(conv)[:, None], dt)
        A = -torch.exp(self.A_log.to(dt.dtype))
        if "ssm_state" not in state:                                   # before the TransPoint
            t = state["keys"].shape[1]
            keys = state["keys"] = torch.cat([state["keys"], B], dim=1)
            values = state["values"] = torch.cat([state["values"], x], dim=1)
            dts = state["dts"] = torch.cat([state["dts"], dt], dim=1)
            y = self._attend(self._rope(C, t), self._rope(keys, 0), values)
            y = grouped_rmsnorm(y.reshape(batch, 1, self.inner), None, self.norm.weight,
                                self.groups, self.eps)
            if t + 1 == self.transpoint:
                # The Memory Converter's exact state; the KV cache is released for good.
                state["ssm_state"] = memory_converter(keys, values, dts, A)
                for name in ("keys", "values", "dts"):
                    del state[name]
            return self.out_proj(y)
        S = state["ssm_state"]
        acc = S.dtype
        x1, dt1 = x[:, 0].to(acc), dt[:, 0].to(acc)                       # [B, H, P], [B, H]
        rep = self.heads // self.groups
        B1 = B[:, 0].to(acc).repeat_interleave(rep, dim=1)                  # [B, H, N]
        C1 = C[:, 0].to(acc).repeat_interleave(rep, dim=1)
        decay = torch.exp(A.to(acc) * dt1)[..., None, None]                       # [B, H, 1, 1]
        S = decay * S + dt1[..., None, None] * x1[..., None] * B1[:, :, None]
        state["ssm_state"] = S
        y = torch.einsum("bhpn,bhn->bhp", S, C1) + self.D.to(acc)[:, None] * x1
        y = grouped_rmsnorm(y.to(x.dtype).reshape(batch, 1, self.inner), z, self.norm.weight,
                            self.groups, self.eps)
        return self.out_proj(y)


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

    def forward(self, hidden, state: Optional[dict]):
        batch, length, _ = hidden.shape
        q = self.q_proj(hidden).view(batch, length, self.heads, self.head_dim)
        k = self.k_proj(hidden).view(batch, length, self.kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(batch, length, self.kv_heads, self.head_dim)
        start = state["keys"].shape[1] if state and "keys" in state else 0
        angles = rope_angles(torch.arange(start, start + length, device=hidden.device),
                             self.head_dim, self.rope_theta)
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        if state is not None:
            if "keys" in state:
                k = torch.cat([state["keys"], k], dim=1)
                v = torch.cat([state["values"], v], dim=1)
            state["keys"], state["values"] = k, v
        total = k.shape[1]
        mask = torch.ones(length, total, dtype=torch.bool, device=hidden.device).tril(total - length)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            scale=1.0 / math.sqrt(self.head_dim), enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class TransMambaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden, state=None):
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

    def forward(self, hidden, state):
        op = self.mixer if self.symbol in "TM" else self.attention if self.symbol == "*" else self.mlp
        return hidden + op(self.norm(hidden), state)



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
            cache = TransMambaHybridCache(self.config)
        return {"input_ids": input_ids, "cache": cache, "use_cache": use_cache}

    def forward(self, input_ids, cache=None, past_key_values=None, labels=None, use_cache=None,
                attention_mask=None, logits_to_keep=0, return_dict=None, **kwargs):
        """input_ids [B, L]; returns logits [B, L, V] (float32 loss when labels are given)."""
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = TransMambaHybridCache(self.config)
        hidden = self.model(input_ids, cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1))
        return TransMambaCausalLMOutput(loss=loss, logits=logits, cache=cache)
