"""Fused RoPE of Q and K (Triton, CPU interpreter) against its reference in float64."""

import pytest
import torch

pytest.importorskip("triton")

from helpers import assert_close, nan_filled_buffers  # noqa: E402
from launches import count_launches  # noqa: E402
from megatron_transmamba.layers.rotary import apply_rope, rope_table  # noqa: E402
from transmamba_kernels.rope import rope_qk as rope_module  # noqa: E402
from transmamba_kernels.rope.naive import rope_qk_naive  # noqa: E402
from transmamba_kernels.rope.rope_qk import rope_qk_triton  # noqa: E402

THETA = 10000.0


@pytest.fixture(autouse=True)
def nan_filled(monkeypatch):
    """New buffers of the kernel module are NaN-filled (helpers.nan_filled_buffers)."""
    nan_filled_buffers(monkeypatch, rope_module)


def packed_table(lengths: list, dim: int) -> torch.Tensor:
    """[S, B, 1, dim] angles whose positions restart at each document of each row."""
    rows = []
    for row in lengths:
        positions = torch.cat([torch.arange(n) for n in row]).float()
        rows.append(positions[:, None] * rope_table(2, dim, THETA)[1, 0, 0])
    return torch.stack(rows, dim=1)[:, :, None, :]


def rope_ref(q, k, table, seq_first=False):
    """float64 reference of both outputs and both gradients against fixed output gradients."""
    g = torch.Generator().manual_seed(1)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k)]
    outs = rope_qk_naive(*leaves, table, seq_first)
    grads_out = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    return outs, torch.autograd.grad(outs, leaves, grads_out), grads_out


def run_triton(q, k, table, grads_out, seq_first=False):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k)]
    outs = rope_qk_triton(*leaves, table, seq_first)
    grads = torch.autograd.grad(outs, leaves, [g.to(o.dtype) for g, o in zip(grads_out, outs)])
    return outs, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_naive_is_apply_rope(dtype):
    table = rope_table(9, 16, THETA)
    t = torch.randn(2, 9, 3, 16, dtype=dtype)
    q_rot, k_rot = rope_qk_naive(t, t[:, :, :1], table)
    assert torch.equal(q_rot, apply_rope(t, table))
    assert torch.equal(k_rot, apply_rope(t[:, :, :1], table))


@pytest.mark.parametrize("B,S,Hq,Hk,dim", [(2, 7, 3, 1, 8), (1, 1, 2, 2, 6), (3, 37, 5, 2, 16),
                                           (1, 5, 20, 3, 4)])
@pytest.mark.parametrize("dtype,ratio", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_forward_backward_match_reference(B, S, Hq, Hk, dim, dtype, ratio):
    q, k = torch.randn(B, S, Hq, dim).to(dtype), torch.randn(B, S, Hk, dim).to(dtype)
    table = rope_table(S + 3, dim, THETA)
    (q_ref, k_ref), (dq_ref, dk_ref), grads_out = rope_ref(q, k, table)
    (q_rot, k_rot), (dq, dk) = run_triton(q, k, table, grads_out)
    assert q_rot.dtype == dtype and q_rot.is_contiguous() and k_rot.is_contiguous()
    for name, ref, out in [("q_rot", q_ref, q_rot), ("k_rot", k_ref, k_rot), ("dq", dq_ref, dq),
                           ("dk", dk_ref, dk)]:
        assert_close(name, ref, out, ratio)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_views_of_the_conv_output_give_the_contiguous_result(dtype):
    B, S, G, H, N = 2, 11, 3, 2, 8
    xbc = torch.randn(B, S, 5 + (G + H) * N).to(dtype)      # conv output [x | C | B ...]
    q = xbc[..., 5:5 + G * N].view(B, S, G, N)
    k = xbc[..., 5 + G * N:].view(B, S, H, N)
    assert not q.is_contiguous() and not k.is_contiguous()
    table = rope_table(S, N, THETA)
    _, _, grads_out = rope_ref(q, k, table)
    outs, grads = run_triton(q, k, table, grads_out)
    outs_c, grads_c = run_triton(q.contiguous(), k.contiguous(), table, grads_out)
    for a, b in zip(outs + grads, outs_c + grads_c):
        assert a.is_contiguous() and torch.equal(a, b)
    # non-contiguous output gradients (an expanded one) are read in place too
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k)]
    q_rot, k_rot = rope_qk_triton(*leaves, table)
    ones = torch.ones((), dtype=dtype).expand(q_rot.shape)
    dq, _ = torch.autograd.grad((q_rot, k_rot), leaves, (ones, torch.zeros_like(k_rot)))
    dq_c, _ = torch.autograd.grad(rope_qk_triton(*leaves, table),
                                  leaves, (ones.contiguous(), torch.zeros_like(k_rot)))
    assert torch.equal(dq, dq_c)


def test_seq_first_layout_matches_batch_first():
    S, B, Hq, Hk, dim = 13, 3, 4, 2, 8
    q, k = torch.randn(S, B, Hq, dim), torch.randn(S, B, Hk, dim)
    table = rope_table(S, dim, THETA)
    (q_ref, k_ref), (dq_ref, dk_ref), grads_out = rope_ref(q, k, table, seq_first=True)
    outs, grads = run_triton(q, k, table, grads_out, seq_first=True)
    assert outs[0].shape == (S, B, Hq, dim) and outs[0].is_contiguous()
    for name, ref, out in zip(["q_rot", "k_rot", "dq", "dk"], [q_ref, k_ref, dq_ref, dk_ref],
                              outs + grads):
        assert_close(name, ref, out, 1e-6)
    # the same numbers as the batch-first layout, transposed
    outs_b, grads_b = run_triton(q.transpose(0, 1), k.transpose(0, 1), table,
                                 [g.transpose(0, 1) for g in grads_out])
    for a, b in zip(outs + grads, outs_b + grads_b):
        assert torch.equal(a, b.transpose(0, 1))


@pytest.mark.parametrize("seq_first", [False, True])
def test_packed_documents_restart_positions(seq_first):
    dim, lengths = 8, [[5, 1, 9], [15]]
    table = packed_table(lengths, dim)                        # [15, 2, 1, dim]
    S, B = table.shape[:2]
    shape_q, shape_k = ((S, B, 3, dim), (S, B, 1, dim)) if seq_first else ((B, S, 3, dim),
                                                                            (B, S, 1, dim))
    q, k = torch.randn(shape_q), torch.randn(shape_k)
    refs, ref_grads, grads_out = rope_ref(q, k, table, seq_first)
    outs, grads = run_triton(q, k, table, grads_out, seq_first)
    for name, ref, out in zip(["q_rot", "k_rot", "dq", "dk"], refs + ref_grads, outs + grads):
        assert_close(name, ref, out, 1e-6)
    # each document of a row is rotated as if it were alone
    q_b = q.transpose(0, 1) if seq_first else q
    q_rot = outs[0].transpose(0, 1) if seq_first else outs[0]
    start = 5 + 1
    alone = apply_rope(q_b[:1, start:start + 9].double(), rope_table(9, dim, THETA))
    assert_close("document alone", alone, q_rot[:1, start:start + 9], 1e-6)


@pytest.mark.parametrize("p", [0, 1, 6, 17])
def test_first_p_tokens(p):
    S, dim = 17, 8
    q, k = torch.randn(2, S, 3, dim), torch.randn(2, S, 2, dim)
    table = rope_table(S, dim, THETA)
    (q_ref, k_ref), (dq_ref, dk_ref), grads_out = rope_ref(q[:, :p], k[:, :p], table)
    (q_rot, k_rot), (dq, dk) = run_triton(q[:, :p], k[:, :p], table, grads_out)
    assert q_rot.shape == (2, p, 3, dim)
    for name, ref, out in [("q_rot", q_ref, q_rot), ("k_rot", k_ref, k_rot), ("dq", dq_ref, dq),
                           ("dk", dk_ref, dk)]:
        assert_close(name, ref, out, 1e-6)


def test_one_launch_forward_one_backward(monkeypatch):
    monkeypatch.undo()   # the NaN fill of new buffers is a launch of the test's own
    B, S, Hq, Hk, dim = 2, 9, 3, 2, 8
    q = torch.randn(B, Hq, S, dim).transpose(1, 2).requires_grad_(True)   # strided leaves
    k = torch.randn(S, B, Hk, dim).transpose(0, 1).requires_grad_(True)
    table = rope_table(S, dim, THETA)
    grads_out = torch.randn(B, S, Hq, dim), torch.randn(B, S, Hk, dim)
    with count_launches() as forward:
        outs = rope_qk_triton(q, k, table)
    with count_launches() as backward:
        torch.autograd.grad(outs, (q, k), grads_out)
    assert (forward.aten, forward.triton) == ([], ["_rope_qk_kernel"])
    assert (backward.aten, backward.triton) == ([], ["_rope_qk_kernel"])


def test_deterministic():
    q, k = torch.randn(2, 19, 4, 16), torch.randn(2, 19, 2, 16)
    table = rope_table(19, 16, THETA)
    _, _, grads_out = rope_ref(q, k, table)
    first, second = run_triton(q, k, table, grads_out), run_triton(q, k, table, grads_out)
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    B, S, G, N = 2, 7, 2, 8
    xbc = torch.randn(B, S, 3 * G * N)
    table = rope_table(S, N, THETA)

    def step(xbc):
        q = xbc[..., G * N:2 * G * N].view(B, S, G, N)
        k = xbc[..., 2 * G * N:].view(B, S, G, N)
        q_rot, k_rot = rope_qk_triton(q, k, table)
        return (q_rot * k_rot).sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaf = xbc.clone().requires_grad_(True)
        loss = fn(leaf)
        loss.backward()
        results.append((loss, leaf.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
