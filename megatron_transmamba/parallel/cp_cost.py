"""A paper model of context parallelism (CP): bytes each rank receives per layer, and activation
memory per rank, for two ways of splitting the sequence of a TransMamba model. Nothing here is
measured; every number is arithmetic on the config (shapes as in ``megatron_transmamba/flops.py``).

Layout assumed by both designs: micro-batch 1, the T tokens split into CP contiguous shards of
S = T / CP tokens (rank r holds [r S, (r + 1) S); no load-balancing zigzag), bf16 activations.

(a) State passing (ours, planned; DESIGN section 2's chunked-scan recurrence across ranks):
    every ``T`` / ``M`` layer with SSM tokens (p < T)
        state   all-gather of each rank's local final SSM state (fp32, H x P x N) and its
                per-head total decay (fp32, H): each rank receives (CP - 1) pieces of
                4 (H P N + H) bytes. The Memory Converter's state at p is the same kind of
                partial sum, so it rides on this all-gather.
        halo    the conv's W - 1 last rows of the previous rank, conv channels HP + 2GN, bf16
                (rank 0 receives none).
    ``T`` layer attention prefix [0, p): a rank whose shard starts before p receives the keys
        (B: G x N) and values (x: H x P) of the earlier shards' tokens below p, bf16; a rank
        starting at or after p receives none (its SSM start state comes from the all-gather).
    ``*`` layer: causal ring attention; rank r receives the K and V (g x k each, bf16) of the
        r S tokens of the earlier shards.
(b) Ulysses-style head all-to-all (megatron-core's approach for Mamba): per ``T`` / ``M`` layer
    an all-to-all of the in_proj outputs (z, x, B, C, dt: 2HP + 2GN + H per token) before the
    mixer and of y (HP per token) after it; per ``*`` layer of Q, K, V ((h + 2g) k) and of the
    attention output (h k). Each rank keeps 1/CP of its shard and receives (CP - 1)/CP S tokens'
    worth. After the first all-to-all a rank holds the whole sequence for H/CP heads, so a
    TransMamba layer needs no halo, state or K/V exchange (it needs H, G and h, g divisible by CP).

Reported: bytes one rank RECEIVES in one layer's forward, averaged over the CP ranks. Every
byte received is sent by another rank, so the average bytes sent equal this and sent + received
is twice it. Backward: the gradient of every received tensor (dstate, dhalo, dK/dV, or the
all-to-alls' inverses) travels back in the same dtype, the same bytes again; a ring-attention
backward that re-circulates K/V instead of keeping them adds the forward K/V bytes once more.
``-`` (MLP) layers are token-local and communicate nothing. CP = 1 communicates nothing.

Activation memory (training, micro-batch 1, bf16, no recomputation) counts the tensors each
layer saves for its backward, per token (d hidden, F FFN width, L chunk size):
    every layer      its norm's input and the first matmul's input: 2 d values
    ``T`` / ``M``    in_proj output 2HP + 2GN + H, conv/SiLU output HP + 2GN, SSD output HP,
                     gated-norm output (out_proj input) HP, all bf16; dt in fp32 (4 H bytes);
                     chunk states 4 H P N / L bytes; attention prefix log-sum-exp 4 G bytes
    ``*``            qkv (h + 2g) k and the attention output h k in bf16; log-sum-exp 4 h bytes
    ``-``            fc1 output (2F for SwiGLU, else F) and fc2 input F, bf16
    head             final norm input and LM head input 2 d (bf16), logits 2 V + fp32 loss copy 4 V
times T / CP tokens. Static memory is ``training.metrics.memory_estimate_bytes`` of the full
parameter count (CP ranks hold every weight; no distributed-optimizer sharding assumed).
"""

from __future__ import annotations

import dataclasses

from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.flops import count_parameters
from megatron_transmamba.training.metrics import memory_estimate_bytes

BF16 = 2
FP32 = 4
H200_BYTES = 141e9
MEMORY_RESERVE = 0.10


def at_length(config: TransMambaConfig, seq_length: int) -> TransMambaConfig:
    """``config`` at training length ``seq_length`` (TransPoints rescale with it)."""
    if config.seq_length == seq_length:
        return config
    return dataclasses.replace(config, seq_length=seq_length)


def _shard(seq_length: int, cp: int) -> int:
    if cp < 1 or seq_length % cp:
        raise ValueError(f"seq_length={seq_length} must split into cp={cp} equal shards")
    return seq_length // cp


def _mixer(config: TransMambaConfig) -> tuple[int, int, int, int]:
    return config.mamba_num_heads, config.mamba_head_dim, config.mamba_num_groups, config.mamba_state_dim


def _attention(config: TransMambaConfig) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    return heads, config.num_query_groups or heads, config.kv_channels


def state_bytes(config: TransMambaConfig, cp: int) -> float:
    """All-gather of the fp32 SSM state H x P x N plus H decays: (CP - 1) pieces received."""
    H, P, _, N = _mixer(config)
    return (cp - 1) * FP32 * (H * P * N + H)


def halo_bytes(config: TransMambaConfig, cp: int) -> float:
    """The conv's W - 1 rows x (HP + 2GN) bf16 from the previous rank, averaged over ranks."""
    H, P, G, N = _mixer(config)
    return (cp - 1) / cp * (config.mamba_conv_kernel - 1) * (H * P + 2 * G * N) * BF16


def prefix_kv_bytes(config: TransMambaConfig, transpoint: int, seq_length: int, cp: int) -> float:
    """K (B: G x N) and V (x: H x P) of earlier shards' tokens below ``transpoint``, bf16,
    received by each rank whose shard starts before it, averaged over ranks."""
    H, P, G, N = _mixer(config)
    shard = _shard(seq_length, cp)
    tokens = sum(min(transpoint, r * shard) for r in range(cp) if r * shard < transpoint)
    return tokens / cp * (G * N + H * P) * BF16


def ring_kv_bytes(config: TransMambaConfig, seq_length: int, cp: int) -> float:
    """Causal ring attention: rank r receives K and V of r S earlier tokens; mean over ranks."""
    _, g, k = _attention(config)
    shard = _shard(seq_length, cp)
    return sum(r * shard for r in range(cp)) / cp * 2 * g * k * BF16


def state_passing_layer_bytes(config: TransMambaConfig, layer_number: int, seq_length: int,
                              cp: int) -> float:
    """Design (a): forward bytes one rank receives in layer ``layer_number`` (mean over ranks).
    ``config.seq_length`` must be ``seq_length`` (see ``at_length``) for the TransPoints."""
    symbol = config.layer_pattern[layer_number]
    if cp == 1 or symbol == "-":
        return 0.0
    if symbol == "*":
        return ring_kv_bytes(config, seq_length, cp)
    transpoint = config.transpoint_of_layer(layer_number)
    total = halo_bytes(config, cp) + prefix_kv_bytes(config, transpoint, seq_length, cp)
    if transpoint < seq_length:
        total += state_bytes(config, cp)
    return total


def all_to_all_layer_bytes(config: TransMambaConfig, layer_number: int, seq_length: int,
                           cp: int) -> float:
    """Design (b): forward bytes one rank receives in the head all-to-alls of one layer."""
    symbol = config.layer_pattern[layer_number]
    if cp == 1 or symbol == "-":
        return 0.0
    if symbol == "*":
        h, g, k = _attention(config)
        width = (h + 2 * g) * k + h * k
    else:
        H, P, G, N = _mixer(config)
        width = (2 * H * P + 2 * G * N + H) + H * P
    return (cp - 1) / cp * _shard(seq_length, cp) * width * BF16


def communication(config: TransMambaConfig, seq_length: int, cp: int) -> dict:
    """Both designs over the whole model at ``seq_length``: mean bytes per sequence-mixing
    layer (``T``, ``M``, ``*``) and the sum over layers, forward, received per rank."""
    config = at_length(config, seq_length)
    mixing = [i for i, s in enumerate(config.layer_pattern) if s in "TM*"]
    ours = sum(state_passing_layer_bytes(config, i, seq_length, cp) for i in mixing)
    theirs = sum(all_to_all_layer_bytes(config, i, seq_length, cp) for i in mixing)
    n = max(len(mixing), 1)
    return {"state_passing_per_layer": ours / n, "all_to_all_per_layer": theirs / n,
            "state_passing_total": ours, "all_to_all_total": theirs, "mixing_layers": len(mixing)}


def activation_bytes_per_token(config: TransMambaConfig, vocab_size: int) -> float:
    """Saved-for-backward bytes per token of the whole model (formula in the module docstring)."""
    d = config.hidden_size
    H, P, G, N = _mixer(config)
    h, g, k = _attention(config)
    F = config.ffn_hidden_size or 4 * d
    total = 2 * d * BF16 + 2 * vocab_size * BF16 + vocab_size * FP32
    for symbol in config.layer_pattern:
        total += 2 * d * BF16
        if symbol in "TM":
            saved = (2 * H * P + 2 * G * N + H) + (H * P + 2 * G * N) + 2 * H * P
            total += saved * BF16 + FP32 * (H + G + H * P * N / config.ssd_chunk_size)
        elif symbol == "*":
            total += ((h + 2 * g) * k + h * k) * BF16 + FP32 * h
        elif symbol == "-":
            total += ((2 * F if config.gated_linear_unit else F) + F) * BF16
    return total


def memory_per_rank(config: TransMambaConfig, vocab_size: int, seq_length: int, cp: int) -> dict:
    """Activations of T / CP tokens plus weights, fp32 grads and Adam state of every parameter."""
    static = memory_estimate_bytes(count_parameters(config, vocab_size), bf16=True,
                                   data_parallel_size=1, distributed_optimizer=False)["total"]
    activations = activation_bytes_per_token(config, vocab_size) * _shard(seq_length, cp)
    return {"activations": activations, "static": static, "total": activations + static}


def max_seq_length(config: TransMambaConfig, vocab_size: int, cp: int,
                   capacity: float = H200_BYTES, reserve: float = MEMORY_RESERVE,
                   lengths: tuple = tuple(2 ** e for e in range(12, 21))) -> int | None:
    """Largest T in ``lengths`` (powers of two, 4k..1M) whose estimate fits in
    capacity x (1 - reserve); None when none does."""
    budget = capacity * (1 - reserve)
    fits = [t for t in lengths if memory_per_rank(config, vocab_size, t, cp)["total"] <= budget]
    return max(fits) if fits else None
