"""Parameter and training-FLOP counts of a TransMamba language model, from its config alone.

One source of truth for the scaling sweeps (``megatron_transmamba.scaling``) and the trainer's
MFU: both call ``count_parameters`` and ``training_flops_per_token`` on the same config.

Parameters (full model, tensor-parallel size 1; d hidden, V padded vocabulary, W conv width,
H/P/G/N the mixer's heads / head dim / groups / state dim, h/g/k the ``*`` layers' heads /
query groups / head dim, F the FFN width):

    embedding V*d + LM head V*d (none when tied) + final norm d + sum over layers of
      T, M  norm d + in_proj d*(2HP + 2GN + H) + conv (HP + 2GN)*(W + 1) + dt_bias, A_log, D 3H
            + grouped-norm weight HP + out_proj HP*d
      *     norm d + qkv d*(h + 2g)*k + proj h*k*d                      (+ biases if enabled)
      -     norm d + fc1 d*F*(2 if SwiGLU else 1) + fc2 F*d             (+ biases if enabled)

Training FLOPs of one sequence of T tokens are 3x the forward FLOPs (backward = 2x forward;
activation recomputation is not counted: these are model FLOPs, as MFU uses). Forward terms,
a multiply-add counting as 2 FLOPs:

    matmul     2 * T * (weights of every matmul: in_proj, out_proj, qkv, proj, fc1, fc2 and the
               LM head; not the embedding lookup, norms or elementwise ops). Summed with the
               3x this is the familiar 6 * params * tokens.
    conv       2 * T * W * (HP + 2GN) per T / M layer (depthwise, over the whole sequence).
    attention  causal score and value products over token pairs (s <= t), counted exactly:
               pairs(n) = n (n + 1) / 2.
                 ``*`` layer: pairs(T) * 4 * h * k          (QK^T and AV, every head)
                 T layer:     pairs(p) * (2 G N + 2 H P)    (one softmax per Q/K group, then
                              its H/G value heads), over the prefix [0, p) only.
    ssm        (T - p) tokens through the chunked SSD (Mamba-2's algorithm, chunk L =
               min(ssd_chunk_size, T - p); kernels compute whole L x L blocks):
                 per token 2 L G N (C B^T within the chunk) + 2 L H P (its product with x)
                         + 2 H P N (chunk states B^T x) + 2 H P N (outputs C * state),
               i.e. per head ~ 2 L (N + P) + 4 P N when G = H. State passing between chunks
               (H P N per chunk) and the D skip are elementwise and not counted.
    converter  the Memory Converter's state S_{p-1} = sum_{s<p} decay * dt_s x_s (x) B_s:
               2 * p * H * P * N, when 0 < p < T (p = 0 has no prefix, p = T no SSM tokens).

``M`` layers are T layers with p = 0; ``*`` layers have full causal attention over T.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from megatron_transmamba.config import TransMambaConfig


def _mixer_shape(config: TransMambaConfig) -> tuple[int, int, int, int]:
    return (config.mamba_num_heads, config.mamba_head_dim, config.mamba_num_groups,
            config.mamba_state_dim)


def _attention_shape(config: TransMambaConfig) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    return heads, groups, config.kv_channels


def _ffn(config: TransMambaConfig) -> int:
    return config.ffn_hidden_size if config.ffn_hidden_size else 4 * config.hidden_size


def layer_parameters(config: TransMambaConfig, symbol: str) -> int:
    """Parameters of one layer of kind ``symbol`` (``T``, ``M``, ``*`` or ``-``), norm included."""
    d = config.hidden_size
    if symbol in "TM":
        H, P, G, N = _mixer_shape(config)
        conv_channels = H * P + 2 * G * N
        return (d + d * (2 * H * P + 2 * G * N + H) + conv_channels * (config.mamba_conv_kernel + 1)
                + 3 * H + H * P + H * P * d)
    if symbol == "*":
        h, g, k = _attention_shape(config)
        qkv_bias = (h + 2 * g) * k if (config.add_bias_linear or config.add_qkv_bias) else 0
        proj_bias = d if config.add_bias_linear else 0
        return d + d * (h + 2 * g) * k + qkv_bias + h * k * d + proj_bias
    if symbol == "-":
        F = _ffn(config)
        fc1_out = 2 * F if config.gated_linear_unit else F
        biases = fc1_out + d if config.add_bias_linear else 0
        return d + d * fc1_out + F * d + biases
    raise ValueError(f"layer symbol {symbol!r}: expected one of 'T', 'M', '*', '-'")


def count_parameters(config: TransMambaConfig, vocab_size: int) -> int:
    """Every parameter of ``TransMambaLanguageModel(config, vocab_size)`` (tensor-parallel size 1;
    under TP the trainer's printed count is one rank's share)."""
    d = config.hidden_size
    layers = sum(layer_parameters(config, s) for s in config.layer_pattern)
    return vocabulary_parameters(config, vocab_size) + d + layers


def vocabulary_parameters(config: TransMambaConfig, vocab_size: int) -> int:
    """The input embedding and the LM head: two V x d matrices, or one when tied."""
    matrices = 1 if config.share_embeddings_and_output_weights else 2
    return matrices * vocab_size * config.hidden_size


def non_embedding_parameters(config: TransMambaConfig, vocab_size: int) -> int:
    """Parameters without the vocabulary matrices (input embedding and LM head, one matrix
    when tied), as in Kaplan et al.'s N."""
    return count_parameters(config, vocab_size) - vocabulary_parameters(config, vocab_size)


def matmul_parameters(config: TransMambaConfig, vocab_size: int) -> int:
    """Weights that multiply every token's activations: the layers' projections and the LM head
    (tied or not, the head is a d x V matmul)."""
    d = config.hidden_size
    total = d * vocab_size
    for symbol in config.layer_pattern:
        if symbol in "TM":
            H, P, G, N = _mixer_shape(config)
            total += d * (2 * H * P + 2 * G * N + H) + H * P * d
        elif symbol == "*":
            h, g, k = _attention_shape(config)
            total += d * (h + 2 * g) * k + h * k * d
        else:
            F = _ffn(config)
            total += d * F * (2 if config.gated_linear_unit else 1) + F * d
    return total


@dataclass(frozen=True)
class FlopCount:
    """FLOPs by term (see the module docstring); add them with ``total``."""

    matmul: float = 0.0
    conv: float = 0.0
    attention: float = 0.0
    ssm: float = 0.0
    memory_converter: float = 0.0

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    def scaled(self, factor: float) -> "FlopCount":
        return FlopCount(**{f.name: getattr(self, f.name) * factor for f in fields(self)})


def _pairs(n: int) -> int:
    return n * (n + 1) // 2


def mixer_forward_flops(config: TransMambaConfig, transpoint: int, seq_length: int) -> FlopCount:
    """Forward FLOPs of one T / M layer's core on one sequence (projections excluded)."""
    H, P, G, N = _mixer_shape(config)
    T, p = seq_length, min(max(int(transpoint), 0), seq_length)
    ssm_tokens = T - p
    chunk = min(config.ssd_chunk_size, ssm_tokens)
    return FlopCount(
        conv=2.0 * T * config.mamba_conv_kernel * (H * P + 2 * G * N),
        attention=float(_pairs(p) * (2 * G * N + 2 * H * P)),
        ssm=float(ssm_tokens * (2 * chunk * G * N + 2 * chunk * H * P + 4 * H * P * N)),
        memory_converter=float(2 * p * H * P * N) if 0 < p < T else 0.0)


def forward_flops_per_sequence(config: TransMambaConfig, vocab_size: int,
                               seq_length: int | None = None) -> FlopCount:
    """Forward FLOPs of one sequence (``seq_length`` defaults to ``config.seq_length``; the
    TransPoints are the config's, which are absolute token positions)."""
    T = seq_length or config.seq_length
    terms = [FlopCount(matmul=2.0 * T * matmul_parameters(config, vocab_size))]
    for index, symbol in enumerate(config.layer_pattern):
        if symbol in "TM":
            terms.append(mixer_forward_flops(config, config.transpoint_of_layer(index), T))
        elif symbol == "*":
            h, _, k = _attention_shape(config)
            terms.append(FlopCount(attention=float(_pairs(T) * 4 * h * k)))
    return FlopCount(**{f.name: sum(getattr(t, f.name) for t in terms) for f in fields(FlopCount)})


def training_flops_per_sequence(config: TransMambaConfig, vocab_size: int,
                                seq_length: int | None = None) -> FlopCount:
    """Forward + backward FLOPs of one training sequence: 3x the forward."""
    return forward_flops_per_sequence(config, vocab_size, seq_length).scaled(3.0)


def training_flops_per_token(config: TransMambaConfig, vocab_size: int) -> float:
    """Training FLOPs per token at the config's sequence length (all terms, averaged over T)."""
    return training_flops_per_sequence(config, vocab_size).total / config.seq_length


def training_flops(config: TransMambaConfig, vocab_size: int, tokens: float) -> float:
    """Training FLOPs of ``tokens`` tokens in sequences of ``config.seq_length``."""
    return training_flops_per_token(config, vocab_size) * tokens
