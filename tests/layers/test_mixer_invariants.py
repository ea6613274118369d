"""The three mixer invariants of DESIGN section 1, forward and backward, in float64.

p = 0 equals Hugging Face transformers' Mamba2Mixer (torch path) and a sequential float64
Mamba-2 recurrence; p = T equals plain causal softmax attention on (C, B, x) with an explicit
score matrix; 0 < p < T is the splice of the two. References here are written independently of
the mixer (explicit loops and matrices, no shared helpers).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_transmamba.config import TransMambaConfig
from transmamba_kernels.reference.memory_converter import memory_converter
from megatron_transmamba.layers.transmamba_mixer import TransMambaMixer

pytestmark = pytest.mark.usefixtures("megatron_single_process")

HIDDEN, H, P, G, N, W, CHUNK = 16, 4, 8, 2, 6, 4, 16


def make_mixer(rope: bool, groups: int = G, dtype=torch.float64, seed: int = 0) -> TransMambaMixer:
    torch.manual_seed(seed)
    cfg = TransMambaConfig(
        hidden_size=HIDDEN, num_attention_heads=4, layer_pattern="T", seq_length=64,
        transpoint_schedule="mamba", mamba_num_heads=H, mamba_head_dim=P, mamba_num_groups=groups,
        mamba_state_dim=N, mamba_conv_kernel=W, ssd_chunk_size=CHUNK, params_dtype=dtype,
        mixer_position_embedding="rope" if rope else "none", use_cpu_initialization=True)
    mixer = TransMambaMixer(cfg, transpoint=0)
    with torch.no_grad():  # make every parameter non-trivial, incl. norm weight and D
        mixer.norm_weight.uniform_(0.5, 1.5)
        mixer.D.uniform_(-1, 1)
        mixer.conv1d.bias.uniform_(-0.5, 0.5)
    return mixer


def rope_table(seq_len: int, dim: int, theta: float = 10000.0) -> torch.Tensor:
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv)
    return torch.cat([angles, angles], -1)[:, None, None, :]        # [S, 1, 1, N] megatron layout


def split_projection(mixer, hidden):
    """hidden [T, B, d] -> z, x, B, C, dt per token, written without the mixer's helpers."""
    wide = hidden @ mixer.in_proj.weight.T                             # [T, B, width]
    T, batch = wide.shape[:2]
    HP, GN = H * P, mixer.groups * N
    z, xbc, dt = wide[..., :HP], wide[..., HP:2 * HP + 2 * GN], wide[..., 2 * HP + 2 * GN:]
    conv = torch.zeros_like(xbc)
    w = mixer.conv1d.weight[:, 0, :]                                   # [channels, W]
    for t in range(T):
        for j in range(W):
            s = t - (W - 1) + j
            if s >= 0:
                conv[t] = conv[t] + xbc[s] * w[:, j]
    xbc = F.silu(conv + mixer.conv1d.bias)
    x = xbc[..., :HP].reshape(T, batch, H, P)
    Bm = xbc[..., HP:HP + GN].reshape(T, batch, mixer.groups, N)
    Cm = xbc[..., HP + GN:].reshape(T, batch, mixer.groups, N)
    dt = F.softplus(dt + mixer.dt_bias)
    return z, x, Bm, Cm, dt


def finish(mixer, y, z, gated):
    """Grouped RMSNorm (optionally gated) and out_proj; y [T, B, H, P] -> [T, B, d]."""
    T, batch = y.shape[:2]
    y = y.reshape(T, batch, H * P)
    if gated:
        y = y * F.silu(z)
    y = y.reshape(T, batch, mixer.groups, -1)
    y = y / torch.sqrt((y * y).mean(-1, keepdim=True) + mixer.config.layernorm_epsilon)
    return (y.reshape(T, batch, H * P) * mixer.norm_weight) @ mixer.out_proj.weight.T


def reference_attention(mixer, hidden, rope):
    z, x, Bm, Cm, dt = split_projection(mixer, hidden)
    T = x.shape[0]
    q, k = Cm, Bm
    if rope is not None:
        cos, sin = rope[:T].cos(), rope[:T].sin()
        rot = lambda t: t * cos + torch.cat([-t[..., N // 2:], t[..., :N // 2]], -1) * sin
        q, k = rot(q), rot(k)
    heads_per_group = H // mixer.groups
    y = torch.zeros_like(x)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    for h in range(H):
        g = h // heads_per_group
        scores = torch.einsum("tbn,sbn->bts", q[:, :, g], k[:, :, g]) / math.sqrt(N)
        probs = torch.softmax(scores.masked_fill(mask, -math.inf), -1)
        y[:, :, h] = torch.einsum("bts,sbp->tbp", probs, x[:, :, h])
    return finish(mixer, y, z, gated=False)


def sequential_states(mixer, x, Bm, dt):
    """S_t for every t by the Mamba-2 recurrence; x [T,B,H,P], Bm [T,B,G,N], dt [T,B,H]."""
    A = -torch.exp(mixer.A_log.double())
    T, batch = x.shape[:2]
    state = torch.zeros(batch, H, P, N, dtype=torch.float64)
    states = []
    for t in range(T):
        Bh = Bm[t].repeat_interleave(H // mixer.groups, dim=1)                 # [B, H, N]
        state = torch.exp(A * dt[t])[..., None, None] * state + \
            (dt[t][..., None, None] * x[t][..., None]) * Bh[:, :, None, :]
        states.append(state)
    return states


def reference_ssm(mixer, hidden):
    z, x, Bm, Cm, dt = split_projection(mixer, hidden)
    states = sequential_states(mixer, x, Bm, dt)
    y = torch.stack([torch.einsum("bhpn,bhn->bhp", S, Cm[t].repeat_interleave(H // mixer.groups, 1))
                     for t, S in enumerate(states)]) + mixer.D[:, None] * x
    return finish(mixer, y, z, gated=True)


def grads(module, hidden, out, weight):
    params = [hidden] + list(module.parameters())
    return torch.autograd.grad((out * weight).sum(), params, allow_unused=True)


def assert_grads_close(got, want, tol):
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None or a.abs().max() == 0
            continue
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"grad #{i}: {m}")


@pytest.mark.parametrize("T", [1, 7, 37, 63])
@pytest.mark.parametrize("rope", [True, False])
def test_transpoint_T_equals_causal_attention(T, rope):
    mixer = make_mixer(rope)
    table = rope_table(T, N) if rope else None
    hidden = torch.randn(T, 2, HIDDEN, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(T, 2, HIDDEN, dtype=torch.float64)
    mixer.transpoint = T
    out, _ = mixer(hidden, rotary_pos_emb=table)
    ref = reference_attention(mixer, hidden, table)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert_grads_close(grads(mixer, hidden, out, weight), grads(mixer, hidden, ref, weight), 1e-9)


@pytest.mark.parametrize("T", [1, 7, 37, 63])
@pytest.mark.parametrize("groups", [1, G, H])
def test_transpoint_0_equals_mamba2_recurrence(T, groups):
    mixer = make_mixer(rope=True, groups=groups)
    hidden = torch.randn(T, 2, HIDDEN, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(T, 2, HIDDEN, dtype=torch.float64)
    mixer.transpoint = 0
    out, _ = mixer(hidden, rotary_pos_emb=rope_table(T, N))
    ref = reference_ssm(mixer, hidden)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    assert_grads_close(grads(mixer, hidden, out, weight), grads(mixer, hidden, ref, weight), 1e-8)


@pytest.mark.parametrize("T,p", [(7, 1), (7, 6), (37, 16), (37, 20), (63, 1), (63, 62), (63, 33)])
def test_intermediate_transpoint_is_the_splice(T, p):
    mixer = make_mixer(rope=True)
    table = rope_table(T, N)
    hidden = torch.randn(T, 2, HIDDEN, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(T, 2, HIDDEN, dtype=torch.float64)
    outs = {}
    for point in (0, T, p):
        mixer.transpoint = point
        outs[point], _ = mixer(hidden, rotary_pos_emb=table)
    torch.testing.assert_close(outs[p][:p], outs[T][:p], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outs[p][p:], outs[0][p:], rtol=1e-9, atol=1e-9)
    spliced_ref = torch.cat([reference_attention(mixer, hidden, table)[:p], reference_ssm(mixer, hidden)[p:]])
    torch.testing.assert_close(outs[p], spliced_ref, rtol=1e-9, atol=1e-9)
    assert_grads_close(grads(mixer, hidden, outs[p], weight), grads(mixer, hidden, spliced_ref, weight), 1e-8)


@pytest.mark.parametrize("p", [1, 5, 16, 40])
def test_memory_converter_equals_sequential_state(p):
    mixer = make_mixer(rope=False)
    hidden = torch.randn(40, 3, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        _, x, Bm, _, dt = split_projection(mixer, hidden)
        want = sequential_states(mixer, x, Bm, dt)[p - 1]
        got = memory_converter(Bm[:p].transpose(0, 1), x[:p].transpose(0, 1), dt[:p].transpose(0, 1),
                               -torch.exp(mixer.A_log.double()))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T", [5, 37, 63])
def test_transpoint_0_equals_huggingface_mamba2(T):
    """Independent implementation: transformers' Mamba2Mixer torch path (float32 scan inside)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    mixer = make_mixer(rope=False)
    hf_cfg = transformers.Mamba2Config(
        hidden_size=HIDDEN, num_heads=H, head_dim=P, n_groups=G, state_size=N, expand=H * P // HIDDEN,
        conv_kernel=W, chunk_size=CHUNK, use_conv_bias=True, use_bias=False,
        layer_norm_epsilon=mixer.config.layernorm_epsilon, rms_norm=True)
    hf = Mamba2Mixer(hf_cfg, layer_idx=0).double()
    with torch.no_grad():
        hf.in_proj.weight.copy_(mixer.in_proj.weight)
        hf.conv1d.weight.copy_(mixer.conv1d.weight)
        hf.conv1d.bias.copy_(mixer.conv1d.bias)
        for name in ("dt_bias", "A_log", "D"):
            getattr(hf, name).copy_(getattr(mixer, name))
        hf.norm.weight.copy_(mixer.norm_weight)
        hf.out_proj.weight.copy_(mixer.out_proj.weight)
    hidden = torch.randn(T, 2, HIDDEN, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(T, 2, HIDDEN, dtype=torch.float64)
    mixer.transpoint = 0
    out, _ = mixer(hidden)
    ref = hf(hidden.transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad((out * weight).sum(), [hidden, mixer.in_proj.weight, mixer.A_log, mixer.dt_bias])
    want = torch.autograd.grad((ref * weight).sum(), [hidden, hf.in_proj.weight, hf.A_log, hf.dt_bias])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-4)
