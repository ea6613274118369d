"""Parameter and FLOP counts from the config: the count equals the built model's, and each FLOP
term follows its formula (megatron_transmamba/flops.py)."""

import pytest

from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.flops import (count_parameters, forward_flops_per_sequence, matmul_parameters,
                                       non_embedding_parameters, training_flops,
                                       training_flops_per_sequence, training_flops_per_token)

SMALL = dict(hidden_size=48, ffn_hidden_size=80, num_attention_heads=3, mamba_num_heads=6,
             mamba_num_groups=2, mamba_head_dim=8, mamba_state_dim=12, seq_length=40,
             ssd_chunk_size=16, use_cpu_initialization=True)


def config(pattern, **kw):
    if "T" in pattern:
        kw.setdefault("transpoint_schedule", "cyclic")
        kw.setdefault("transpoint_values", [0, 7, 40])
    else:
        kw.setdefault("transpoint_schedule", "mamba")
    return TransMambaConfig(**{**SMALL, "layer_pattern": pattern, **kw})


@pytest.mark.parametrize("pattern, kw", [
    ("T-T-", {}),
    ("M-M-", {}),
    ("*-*-", {}),
    ("M-*-T-TT-", {}),
    ("*-*-", {"num_query_groups": 1, "kv_channels": 10}),
    ("T-*-", {"add_bias_linear": True, "ffn_hidden_size": None, "mamba_conv_kernel": 3}),
    ("*-", {"gated_linear_unit": False}),
])
def test_parameter_count_equals_the_built_model(megatron_single_process, pattern, kw):
    from megatron_transmamba.models.language_model import TransMambaLanguageModel
    from megatron_transmamba.models.language_model import count_parameters as count_built

    cfg = config(pattern, **kw)
    model = TransMambaLanguageModel(cfg, vocab_size=64)
    assert count_parameters(cfg, 64) == count_built(model)
    assert non_embedding_parameters(cfg, 64) == count_built(model) - 2 * 64 * cfg.hidden_size


def test_matmul_flops_are_six_params_tokens_with_the_lm_head():
    cfg = config("-")
    d, F, V, T = 48, 80, 64, 40
    assert matmul_parameters(cfg, V) == 3 * d * F + d * V
    flops = training_flops_per_sequence(cfg, V)
    assert flops.matmul == 6 * (3 * d * F + d * V) * T
    assert flops.total == flops.matmul


def test_attention_layer_is_full_causal_attention():
    cfg = config("*", num_attention_heads=3, kv_channels=10)
    T = cfg.seq_length
    flops = forward_flops_per_sequence(cfg, 64)
    assert flops.attention == T * (T + 1) / 2 * 4 * 3 * 10
    assert flops.ssm == flops.memory_converter == flops.conv == 0


def mixer_flops(transpoint, seq_length=40, chunk=16):
    cfg = config("T", transpoint_schedule="fixed", transpoint_values=[transpoint],
                 seq_length=seq_length, ssd_chunk_size=chunk)
    return forward_flops_per_sequence(cfg, 64)


def test_transmamba_attention_is_quadratic_in_the_transpoint_and_ssm_linear_in_the_rest():
    H, P, G, N, W, T = 6, 8, 2, 12, 4, 40
    for p in (0, 1, 7, 39, 40):
        f = mixer_flops(p)
        assert f.attention == p * (p + 1) / 2 * (2 * G * N + 2 * H * P), p
        L = min(16, T - p)
        assert f.ssm == (T - p) * (2 * L * G * N + 2 * L * H * P + 4 * H * P * N), p
        assert f.memory_converter == (2 * p * H * P * N if 0 < p < T else 0), p
        assert f.conv == 2 * T * W * (H * P + 2 * G * N), p
    # p = T is pure attention, p = 0 pure SSM (no converter at either end)
    assert mixer_flops(40).ssm == 0 and mixer_flops(0).attention == 0
    # the SSM term per token is constant (linear in T - p) once T - p >= chunk
    assert mixer_flops(0, seq_length=80).ssm == 2 * mixer_flops(0, seq_length=40).ssm


def test_mamba_layer_counts_as_transmamba_with_transpoint_zero():
    m = forward_flops_per_sequence(config("M-"), 64)
    t = forward_flops_per_sequence(config("T-", transpoint_schedule="fixed", transpoint_values=[0]), 64)
    assert m == t


def test_per_token_and_budget_helpers_agree():
    cfg = config("M-*-T-")
    per_seq = training_flops_per_sequence(cfg, 64)
    assert per_seq == forward_flops_per_sequence(cfg, 64).scaled(3.0)
    assert training_flops_per_token(cfg, 64) == pytest.approx(per_seq.total / 40)
    assert training_flops(cfg, 64, 4000) == pytest.approx(100 * per_seq.total)
