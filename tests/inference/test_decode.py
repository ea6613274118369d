"""Decoding (prefill + one step per token) against the full forward, exactly, in float64.

The model's ``prefill`` + ``step`` logits equal its training forward's within 1e-10 for ``T``,
``M`` and ``*`` layers, with prompts ending before, at and after a TransPoint (the prefill then
ends on attention, on the Memory Converter, or in the SSM) and with layers whose TransPoints are
packed together (0, 1, 2, neighbours, the sequence length); the prefill runs each mixer once;
a ``T`` / ``M`` layer's cache is constant from its TransPoint on; states follow the dtype
policy. The reference functions alone are checked the same way at odd lengths.
"""

import collections
import functools

import pytest
import torch

from helpers import perturb_norms_and_dt
from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.inference.generate import generate
from megatron_transmamba.layers.attention import SelfAttentionFusedRope
from megatron_transmamba.layers.transmamba_mixer import TransMambaMixer
from megatron_transmamba.models.language_model import TransMambaLanguageModel
from transmamba_kernels.reference.conv import (causal_conv1d_silu_naive,
                                               causal_conv1d_silu_step_naive, causal_conv_state)
from transmamba_kernels.reference.mixer import (MixerShape, MixerWeights, allocate_mixer_cache,
                                                mixer_forward, mixer_step)
from transmamba_kernels.reference.ssd import chunk_ssd_naive, ssd_step_naive

SEQ = 48
SMALL = dict(hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, mamba_num_heads=4,
             mamba_num_groups=2, mamba_head_dim=8, mamba_state_dim=8, seq_length=SEQ,
             ssd_chunk_size=16, use_cpu_initialization=True)
EXACT = 1e-10


def build(pattern, transpoints=None, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    schedule = dict(transpoint_schedule="list", transpoint_values=transpoints) if transpoints \
        else dict(transpoint_schedule="mamba")
    cfg = TransMambaConfig(**{**SMALL, "params_dtype": dtype, "layer_pattern": pattern,
                              **schedule, **kw})
    model = TransMambaLanguageModel(cfg, vocab_size=64).to(dtype).eval()
    perturb_norms_and_dt(model)
    return model


def decoded_logits(model, tokens, prompt_len):
    """Prefill of the first ``prompt_len`` tokens, then one step per token: logits [B, T, V]."""
    cache = model.allocate_inference_cache(tokens.shape[0], tokens.shape[1])
    with torch.no_grad():
        logits = [model.prefill(tokens[:, :prompt_len], cache)]
        for t in range(prompt_len, tokens.shape[1]):
            logits.append(model.step(tokens[:, t:t + 1], cache))
    assert cache.seen_tokens == tokens.shape[1]
    return torch.cat(logits, dim=1)


# pattern, TransPoints of its T layers, prompt lengths: before / at / after each TransPoint
CASES = [
    ("T-", [20], [1, 19, 20, 21, 37]),
    ("M-", None, [1, 16, 30]),
    ("*-", None, [1, 17, 40]),
    ("T-*-M-T-", [12, 30], [5, 12, 13, 29, 30, 31, 47]),
    # packed TransPoints: 0, 1, 2, neighbours 17 / 18 and the whole sequence (never switches)
    ("TTTTTT-", [0, 1, 2, 17, 18, SEQ], [1, 2, 3, 17, 18, 19, SEQ - 1]),
]


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("pattern,transpoints,prompts", CASES,
                         ids=[c[0] for c in CASES])
def test_step_by_step_logits_equal_the_full_forward(pattern, transpoints, prompts):
    model = build(pattern, transpoints)
    tokens = torch.randint(0, 64, (2, SEQ))
    with torch.no_grad():
        full = model(tokens)
    for prompt_len in prompts:
        diff = (decoded_logits(model, tokens, prompt_len) - full).abs().max().item()
        assert diff <= EXACT, (pattern, prompt_len, diff)


@pytest.mark.usefixtures("megatron_single_process")
def test_decoding_without_mixer_rope():
    model = build("T-*-T-", [9, 33], mixer_position_embedding="none")
    tokens = torch.randint(0, 64, (2, SEQ))
    with torch.no_grad():
        full = model(tokens)
    for prompt_len in (4, 9, 40):
        assert (decoded_logits(model, tokens, prompt_len) - full).abs().max().item() <= EXACT


@pytest.mark.usefixtures("megatron_single_process")
def test_prefill_is_the_training_forward_and_runs_each_mixer_once(monkeypatch):
    model = build("T-*-M-T-", [12, 30])
    calls = collections.Counter()

    def counted(cls, name):
        real = getattr(cls, name)

        @functools.wraps(real)
        def wrapper(self, *args, **kwargs):
            calls[f"{cls.__name__}.{name}"] += 1
            return real(self, *args, **kwargs)
        monkeypatch.setattr(cls, name, wrapper)

    for cls, name in ((TransMambaMixer, "forward"), (TransMambaMixer, "step"),
                      (TransMambaMixer, "_core_forward"), (SelfAttentionFusedRope, "forward"),
                      (SelfAttentionFusedRope, "step")):
        counted(cls, name)
    prompt = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        full = model(prompt)
    assert calls == {"TransMambaMixer.forward": 3, "TransMambaMixer._core_forward": 3,
                     "SelfAttentionFusedRope.forward": 1}
    calls.clear()
    cache = model.allocate_inference_cache(2, 25)
    with torch.no_grad():
        prefill = model.prefill(prompt, cache)
    assert torch.equal(prefill, full)                # the torch backend's forward, bit for bit
    assert calls == {"TransMambaMixer.forward": 3, "SelfAttentionFusedRope.forward": 1}
    calls.clear()
    generate(model, prompt, max_new_tokens=5)        # prefill, then 4 steps
    assert calls == {"TransMambaMixer.forward": 3, "SelfAttentionFusedRope.forward": 1,
                     "TransMambaMixer.step": 3 * 4, "SelfAttentionFusedRope.step": 4}


@pytest.mark.usefixtures("megatron_single_process")
def test_mixer_cache_is_constant_after_the_transpoint():
    model = build("T-M-*-", [8])
    tokens = torch.randint(0, 64, (1, SEQ))
    cache = model.allocate_inference_cache(1, SEQ)
    nbytes, kv = [], []
    with torch.no_grad():
        model.prefill(tokens[:, :4], cache)
        for t in range(4, SEQ):
            model.step(tokens[:, t:t + 1], cache)
            nbytes.append([cache.layer_nbytes(i) for i in (0, 2, 4)])
            kv.append([cache.kv_length(i) for i in (0, 2, 4)])
    # index j: after 5 + j tokens; the T layer (p = 8) switches after its 8th token
    before, after = nbytes[8 - 5 - 1], nbytes[8 - 5:]
    assert kv[8 - 5 - 1] == [7, 0, 7] and kv[8 - 5] == [0, 0, 8]
    assert {row[0] for row in after} == {row[1] for row in nbytes} == {nbytes[-1][1]}
    assert before[0] > after[0][0] and cache.layers[0].keys is None
    state = cache.layers[0]
    assert state.ssm_state.shape == (1, 4, 8, 8) and state.conv_state.shape == (1, 64, 3)
    assert kv[-1][2] == SEQ                                  # '*' keeps every key


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32),
                                               (torch.bfloat16, torch.float32),
                                               (torch.float64, torch.float64)])
def test_state_dtype_policy(dtype, state_dtype):
    """SSM states and dt in float32 (float64 for a float64 model); conv states, keys and values
    in the model's dtype; the switch keeps the policy."""
    model = build("T-", [6], dtype=dtype)
    cache = model.allocate_inference_cache(1, 12)
    tokens = torch.randint(0, 64, (1, 12))
    layer = cache.layers[0]
    with torch.no_grad():
        model.prefill(tokens[:, :3], cache)
        assert (layer.dts.dtype, layer.keys.dtype, layer.values.dtype) == (state_dtype, dtype, dtype)
        for t in range(3, 12):
            logits = model.step(tokens[:, t:t + 1], cache)
    assert layer.keys is None and torch.isfinite(logits).all()
    assert (layer.ssm_state.dtype, layer.conv_state.dtype) == (state_dtype, dtype)


# The reference functions alone: odd lengths, chunk borders, p in {0, 1, 5, T-1, T, > T}.
def _reference_mixer(transpoint, rope, seq_len=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = MixerShape(heads=4, head_dim=3, groups=2, state_dim=4, conv_kernel=4, chunk_size=8,
                       transpoint=transpoint, eps=1e-5, dt_limit=(0.001, 0.5),
                       rope_theta=10000.0 if rope else None)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    weights = MixerWeights(rand(shape.conv_channels, 1, 4) * 0.5, rand(shape.conv_channels) * 0.3,
                           rand(4) - 1.0, torch.log(torch.rand(4, generator=gen, dtype=torch.float64)
                                                    * 8 + 1), rand(4), 1 + 0.3 * rand(shape.inner))
    projected = rand(2, seq_len, shape.inner + shape.conv_channels + shape.heads)
    return shape, weights, projected


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no_rope"])
@pytest.mark.parametrize("transpoint", [0, 1, 5, 36, 37, 40])
def test_reference_step_equals_reference_forward(transpoint, rope):
    shape, weights, projected = _reference_mixer(transpoint, rope)
    full = mixer_forward(projected, shape, weights)
    for prompt_len in sorted({1, 8, min(transpoint, 36) or 1, 30}):
        cache = allocate_mixer_cache(shape, 2, 37, torch.float64)
        outs = [mixer_forward(projected[:, :prompt_len], shape, weights, cache)]
        outs += [mixer_step(projected[:, t], shape, weights, cache)[:, None]
                 for t in range(prompt_len, 37)]
        diff = (torch.cat(outs, dim=1) - full).abs().max().item()
        assert diff <= 1e-12, (prompt_len, diff)
        assert (cache.keys is None) == (transpoint <= 37) and cache.length == 37


def test_ssd_step_and_conv_step_chain_to_the_scans():
    gen = torch.Generator().manual_seed(1)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x, dt, A, B, C, D = rand(2, 21, 4, 3), torch.rand(2, 21, 4, generator=gen,
                                                      dtype=torch.float64), -rand(4).abs(), \
        rand(2, 21, 2, 5), rand(2, 21, 2, 5), rand(4)
    y, final = chunk_ssd_naive(x, dt, A, B, C, 8, D=D, return_final_states=True)
    state, ys = torch.zeros(2, 4, 3, 5, dtype=torch.float64), []
    for t in range(21):
        y_t, state = ssd_step_naive(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y_t)
    assert (torch.stack(ys, 1) - y).abs().max() <= 1e-12 and (state - final).abs().max() <= 1e-12
    inputs, weight, bias = rand(2, 9, 6), rand(6, 1, 4), rand(6)
    conv = causal_conv1d_silu_naive(inputs, weight, bias)
    conv_state = causal_conv_state(inputs[:, :2], 4)
    for t in range(2, 9):
        out, conv_state = causal_conv1d_silu_step_naive(inputs[:, t], conv_state, weight, bias)
        assert (out - conv[:, t]).abs().max() <= 1e-14
    assert torch.equal(conv_state, causal_conv_state(inputs, 4))
