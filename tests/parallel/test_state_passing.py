"""State passing across context-parallel shards: the sharded SSD simulation against the full
scan (forward and backward, float64) and the shard composition against a sequential loop."""
import pytest
import torch

from transmamba_kernels.ssd import chunk_ssd_naive
from megatron_transmamba.parallel.state_passing import (
    compose_initial_states,
    shard_summary,
    sharded_ssd_reference,
)

BATCH, HEADS, GROUPS, HEAD_DIM, STATE_DIM, CHUNK = 2, 4, 2, 3, 5, 16


def _inputs(seqlen, dtype=torch.float64):
    x = torch.randn(BATCH, seqlen, HEADS, HEAD_DIM, dtype=dtype)
    dt = torch.rand(BATCH, seqlen, HEADS, dtype=dtype) * 0.5 + 0.05  # processed, positive
    A = -torch.rand(HEADS, dtype=dtype) * 2 - 0.1
    B = torch.randn(BATCH, seqlen, GROUPS, STATE_DIM, dtype=dtype)
    C = torch.randn(BATCH, seqlen, GROUPS, STATE_DIM, dtype=dtype)
    D = torch.randn(HEADS, dtype=dtype)
    return x, dt, A, B, C, D


def _sequential(log_decays, final_states, initial_state):
    """h_in(0) = h_0, h_in(r + 1) = exp(l_r) h_in(r) + S_r."""
    state = torch.zeros_like(final_states[0]) if initial_state is None else initial_state
    out = []
    for log_decay, final in zip(log_decays, final_states):
        out.append(state)
        state = torch.exp(log_decay)[..., None, None] * state + final
    return torch.stack(out)


@pytest.mark.parametrize("seqlen", [64, 96])
@pytest.mark.parametrize("num_shards", [1, 2, 4])
@pytest.mark.parametrize("with_initial", [False, True])
def test_sharded_equals_full_scan(seqlen, num_shards, with_initial):
    x, dt, A, B, C, D = _inputs(seqlen)
    h0 = torch.randn(BATCH, HEADS, HEAD_DIM, STATE_DIM, dtype=torch.float64) if with_initial else None
    y_ref, final_ref = chunk_ssd_naive(
        x, dt, A, B, C, CHUNK, D=D, initial_states=h0, return_final_states=True
    )
    y, final = sharded_ssd_reference(
        x, dt, A, B, C, CHUNK, D=D, num_shards=num_shards, initial_states=h0, return_final_states=True
    )
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("num_shards", [2, 4])
def test_sharded_gradients_equal_full_scan(num_shards):
    inputs = [t.requires_grad_() for t in _inputs(64)]
    x, dt, A, B, C, D = inputs
    h0 = torch.randn(BATCH, HEADS, HEAD_DIM, STATE_DIM, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(BATCH, 64, HEADS, HEAD_DIM, dtype=torch.float64)
    wanted = [x, dt, A, B, C, D, h0]

    def grads(fn, **kwargs):
        y, final = fn(x, dt, A, B, C, CHUNK, D=D, initial_states=h0, return_final_states=True, **kwargs)
        loss = (y * weight).sum() + final.pow(2).sum()
        return torch.autograd.grad(loss, wanted)

    ref = grads(chunk_ssd_naive)
    out = grads(sharded_ssd_reference, num_shards=num_shards)
    for name, g_ref, g in zip(["x", "dt", "A", "B", "C", "D", "h0"], ref, out):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"d{name}: {m}")


def test_num_shards_must_divide_seqlen():
    x, dt, A, B, C, D = _inputs(100)
    with pytest.raises(ValueError, match="must divide the sequence length T = 100"):
        sharded_ssd_reference(x, dt, A, B, C, CHUNK, D=D, num_shards=8)
    with pytest.raises(ValueError, match="positive int"):
        sharded_ssd_reference(x, dt, A, B, C, CHUNK, D=D, num_shards=0)


@pytest.mark.parametrize("shards", [1, 3, 8])
@pytest.mark.parametrize("with_initial", [False, True])
def test_compose_matches_sequential_loop(shards, with_initial):
    log_decays = -torch.rand(shards, BATCH, HEADS, dtype=torch.float64) * 3
    final_states = torch.randn(shards, BATCH, HEADS, HEAD_DIM, STATE_DIM, dtype=torch.float64)
    h0 = torch.randn(BATCH, HEADS, HEAD_DIM, STATE_DIM, dtype=torch.float64) if with_initial else None
    out = compose_initial_states(log_decays, final_states, h0)
    torch.testing.assert_close(out, _sequential(log_decays, final_states, h0), rtol=1e-12, atol=1e-12)
    expected_first = torch.zeros_like(final_states[0]) if h0 is None else h0
    assert torch.equal(out[0], expected_first)


def test_compose_float32_output_for_low_precision_inputs():
    log_decays = -torch.rand(3, BATCH, HEADS, dtype=torch.bfloat16)
    final_states = torch.randn(3, BATCH, HEADS, HEAD_DIM, STATE_DIM, dtype=torch.bfloat16)
    assert compose_initial_states(log_decays, final_states).dtype == torch.float32


def test_huge_negative_log_decay_forgets_exactly():
    # Shard 1 forgets everything: shards 2 and 3 see only what comes after it, exactly, and
    # the small decays next to the huge one are not lost to cancellation.
    log_decays = torch.tensor([-0.3, -1e4, -0.25, -0.5], dtype=torch.float32)[:, None, None]
    log_decays = log_decays.expand(4, BATCH, HEADS).clone().requires_grad_()
    final_states = torch.randn(4, BATCH, HEADS, HEAD_DIM, STATE_DIM, requires_grad=True)
    h0 = torch.randn(BATCH, HEADS, HEAD_DIM, STATE_DIM, requires_grad=True)
    out = compose_initial_states(log_decays, final_states, h0)
    assert torch.isfinite(out).all()
    assert torch.equal(out[2], final_states[1].detach())
    torch.testing.assert_close(out[3], torch.exp(torch.tensor(-0.25)) * final_states[1] + final_states[2])
    out.pow(2).sum().backward()
    for t in (log_decays, final_states, h0):
        assert torch.isfinite(t.grad).all()
    # Nothing reaches past the forgetting shard: h0 and S_0 get gradient only through out[0..1].
    expected = 2 * out[0].detach() + 2 * torch.exp(torch.tensor(-0.3)) * out[1].detach()
    torch.testing.assert_close(h0.grad, expected)


def test_shard_summary():
    x, dt, A, B, C, D = _inputs(32)
    _, final = chunk_ssd_naive(x, dt, A, B, C, CHUNK, return_final_states=True)
    log_decay, state = shard_summary(dt, A, final)
    assert log_decay.shape == (BATCH, HEADS) and log_decay.dtype == torch.float64
    torch.testing.assert_close(log_decay, (dt * A).sum(dim=1))
    assert state is final or torch.equal(state, final)
    log_decay32, state32 = shard_summary(dt.bfloat16(), A.bfloat16(), final.bfloat16())
    assert log_decay32.dtype == torch.float32 and state32.dtype == torch.float32
    with pytest.raises(ValueError, match="final_state must be"):
        shard_summary(dt, A, final[:, :1])
