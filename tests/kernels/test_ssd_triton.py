"""Triton SSD (``transmamba_kernels.ssd.chunk``) against the float64 chunked reference.

Runs under Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is imported) at
tiny shapes in float32 and float16; bf16 is checked on the GPU (tools/bench/bench_ssd.py).
New buffers are filled with NaN so a kernel that skips a write fails.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from helpers import assert_close, nan_filled_buffers  # noqa: E402
from transmamba_kernels.ssd import chunk as chunk_module  # noqa: E402
from transmamba_kernels.ssd.chunk import chunk_ssd_triton  # noqa: E402
from transmamba_kernels.ssd.naive import chunk_ssd_naive  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)


@pytest.fixture(autouse=True)
def nan_filled(monkeypatch):
    """New buffers of the kernel module are NaN-filled (helpers.nan_filled_buffers)."""
    nan_filled_buffers(monkeypatch, chunk_module)


def make_inputs(batch, T, H, P, G, N, dtype, seed=0, init=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return dict(
        x=r(batch, T, H, P).to(dtype), dt=r(batch, T, H).to(dtype), A=-(torch.rand(H, generator=g) + 0.5),
        B=r(batch, T, G, N).to(dtype), C=r(batch, T, G, N).to(dtype), D=r(H), z=r(batch, T, H, P).to(dtype),
        dt_bias=r(H), initial_states=r(batch, H, P, N) if init else None)


def run(fn, inputs, chunk_size, **extra):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    y, final = fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], chunk_size,
                  D=leaves["D"], z=leaves["z"], dt_bias=leaves["dt_bias"],
                  initial_states=leaves.get("initial_states"), dt_softplus=True,
                  return_final_states=True, **extra)
    return y, final, leaves


def compare(inputs, chunk_size, transpoint, ratio_fwd, ratio_bwd, seed=1):
    y, final, leaves = run(chunk_ssd_triton, inputs, chunk_size, transpoint=transpoint)
    ref_inputs = {k: (v.double() if v is not None else None) for k, v in inputs.items()}
    y_ref, final_ref, ref_leaves = run(chunk_ssd_naive, ref_inputs, chunk_size)
    rows = (torch.arange(y.shape[1]) >= transpoint)[None, :, None, None]
    y_ref = y_ref * rows
    assert_close("y", y_ref, y.double(), ratio_fwd)
    assert_close("final_states", final_ref, final.double(), ratio_fwd)
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g)
    dfinal = torch.randn(final.shape, generator=g)
    ((y.float() * dy).sum() + (final * dfinal).sum()).backward()
    ((y_ref * dy.double()).sum() + (final_ref * dfinal.double()).sum()).backward()
    for name, leaf in leaves.items():
        ref = ref_leaves[name].grad
        if name in ("z", "D") and transpoint >= y.shape[1]:
            assert leaf.grad.abs().max() == 0, name
            continue
        assert_close(f"d{name}", ref, leaf.grad.double(), ratio_bwd)


def positions_in_documents(lengths, T):
    pos = torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0)
    assert len(pos) == T
    return pos


def compare_packed(lengths, H, P, G, N, transpoint, seed=3):
    """Packed documents (cu_seqlens, one initial state each) in float32 against the float64
    reference: outputs, final states and every input's gradient within 1e-5."""
    T = sum(lengths)
    inputs = make_inputs(1, T, H, P, G, N, torch.float32, init=False)
    inputs["initial_states"] = torch.randn(len(lengths), H, P, N)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()))
    y, final, leaves = run(chunk_ssd_triton, inputs, 16, transpoint=transpoint, cu_seqlens=cu)
    ref_inputs = {k: v.double() for k, v in inputs.items()}
    y_ref, final_ref, ref_leaves = run(chunk_ssd_naive, ref_inputs, 16, cu_seqlens=cu)
    y_ref = y_ref * (positions_in_documents(lengths, T) >= transpoint)[None, :, None, None]
    assert_close("y", y_ref, y.double(), 1e-5)
    assert_close("final_states", final_ref, final.double(), 1e-5)
    g = torch.Generator().manual_seed(seed)
    dy, dfinal = torch.randn(y.shape, generator=g), torch.randn(final.shape, generator=g)
    ((y * dy).sum() + (final * dfinal).sum()).backward()
    ((y_ref * dy.double()).sum() + (final_ref * dfinal.double()).sum()).backward()
    for name, leaf in leaves.items():
        assert_close(f"d{name}", ref_leaves[name].grad, leaf.grad.double(), 1e-5)


@pytest.mark.parametrize("T,transpoint", [(1, 0), (7, 0), (37, 0), (37, 1), (37, 20), (37, 16),
                                          (37, 32), (37, 37), (64, 63)])
def test_float32_matches_reference(T, transpoint):
    compare(make_inputs(2, T, 4, 8, 2, 16, torch.float32), 16, transpoint, 1e-5, 1e-5)


@pytest.mark.parametrize("G", [1, 4])
def test_groups_and_no_initial_state(G):
    compare(make_inputs(1, 40, 4, 8, G, 16, torch.float32, init=False), 16, 9, 1e-5, 1e-5)


def test_odd_head_and_state_dims():
    compare(make_inputs(1, 20, 2, 12, 1, 10, torch.float32), 16, 3, 1e-5, 1e-5)


def test_float16_within_twice_torch_error():
    inputs = make_inputs(1, 33, 2, 16, 1, 16, torch.float16)
    y, _, _ = run(chunk_ssd_triton, inputs, 16, transpoint=5)
    ref = {k: (v.double() if v is not None else None) for k, v in inputs.items()}
    y_ref, _, _ = run(chunk_ssd_naive, ref, 16)
    rows = (torch.arange(33) >= 5)[None, :, None, None]
    # PyTorch's own float16 error: the reference computed from float16-rounded inputs, cast back
    torch_err = ((y_ref.half().double() - y_ref) * rows).norm() / (y_ref * rows).norm()
    err = (y.double() - y_ref * rows).norm() / (y_ref * rows).norm()
    assert err <= max(2 * torch_err, 2e-3), (err, torch_err)


def test_float16_gradients_and_states_kept_in_float16():
    """fp16 inputs keep the per-chunk states and state gradients in fp16 between the kernels
    (half the bytes); the gradients stay within fp16 rounding of the float64 reference."""
    inputs = make_inputs(1, 70, 2, 16, 1, 16, torch.float16, init=False)
    kept = []
    real = chunk_module._ssd_fwd
    def spy(*args):
        out = real(*args)
        kept.append(out[2].dtype)
        return out
    chunk_module._ssd_fwd, saved = spy, real
    try:
        y, _, leaves = run(chunk_ssd_triton, inputs, 16, transpoint=5)
    finally:
        chunk_module._ssd_fwd = saved
    assert kept == [torch.float16]
    ref_inputs = {k: (v.double() if v is not None else None) for k, v in inputs.items()}
    y_ref, _, ref_leaves = run(chunk_ssd_naive, ref_inputs, 16)
    rows = (torch.arange(70) >= 5)[None, :, None, None]
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    (y.float() * dy).sum().backward()
    (y_ref * rows * dy.double()).sum().backward()
    # Per-token gradients: fp16 rounding. dA and d dt_bias are sums over all tokens whose terms
    # cancel; they measure ~1e-2 with float32 states kept as well.
    for name, ratio in (("x", 2e-3), ("dt", 2e-3), ("B", 2e-3), ("C", 2e-3), ("A", 5e-2),
                        ("dt_bias", 5e-2)):
        assert_close(f"d{name}", ref_leaves[name].grad, leaves[name].grad.double(), ratio)


@pytest.mark.parametrize("packed", [False, True])
def test_other_tilings_match_reference(packed, monkeypatch):
    """Block sizes smaller than the head and state dims (several P blocks in the chunk kernels,
    a 3 x 2 grid of state blocks with one chunk-end decay partial each, two N blocks of dB and
    of dC, two chunks per tiled state-passing step): the tilings the GPU autotuner may pick
    give the reference's results."""
    monkeypatch.setattr(chunk_module, "_interpreter_blocks",
                        lambda kernel, P, N: {"BLOCK_P": 16, "BLOCK_N": 32}
                        if kernel in ("states", "dbc") else {"BLOCK_P": 16})
    monkeypatch.setattr(chunk_module, "_passing_chunks", lambda num_chunks: 2)
    if not packed:
        compare(make_inputs(2, 37, 2, 40, 1, 56, torch.float32), 16, 20, 1e-5, 1e-5)
        return
    compare_packed([9, 25], 2, 40, 1, 56, transpoint=4)


def test_bad_arguments_are_clear():
    inputs = make_inputs(1, 8, 2, 8, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="chunk_size=24"):
        chunk_ssd_triton(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], 24)
    with pytest.raises(ValueError, match="initial_states must have shape"):
        chunk_ssd_triton(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], 16,
                         initial_states=inputs["initial_states"],
                         cu_seqlens=torch.tensor([0, 3, 8]))
    with pytest.raises(ValueError, match="B must have shape"):
        chunk_ssd_triton(inputs["x"], inputs["dt"], inputs["A"], inputs["B"][:, :4], inputs["C"], 16)




@pytest.mark.parametrize("lengths,transpoint", [([5, 20, 12], 0), ([5, 20, 12], 7),
                                                ([16, 0, 21], 3), ([3], 0), ([40, 1], 18)])
def test_packed_documents_match_reference(lengths, transpoint):
    """cu_seqlens: the state resets per document, each starts from its own initial state, and
    the TransPoint counts from each document's first token."""
    compare_packed(lengths, 4, 8, 2, 16, transpoint)


def test_packed_seq_idx_over_two_rows():
    inputs = make_inputs(2, 24, 2, 8, 1, 16, torch.float32, init=False)
    seq_idx = torch.tensor([[0] * 10 + [1] * 14, [2] * 24], dtype=torch.int32)
    y, final, leaves = run(chunk_ssd_triton, inputs, 16, seq_idx=seq_idx)
    y_ref, final_ref, _ = run(chunk_ssd_naive, {k: v.double() for k, v in inputs.items() if v is not None},
                              16, seq_idx=seq_idx)
    assert final.shape[0] == 3
    assert_close("y", y_ref, y.double(), 1e-5)
    assert_close("final_states", final_ref, final.double(), 1e-5)


@pytest.mark.parametrize("transpoint", [0, 13])
def test_strided_views_read_in_place_equal_contiguous_inputs(transpoint, monkeypatch):
    """x, B and C as views into one [B, T, channels] tensor (the mixer's conv output) are read
    in place, with their token strides, and give bitwise the results of contiguous copies."""
    batch, T, H, P, G, N = 2, 37, 4, 8, 2, 16
    g = torch.Generator().manual_seed(3)
    xbc = torch.randn(batch, T, H * P + 2 * G * N + 5, generator=g)     # 5 extra channels
    dt = torch.rand(batch, T, H, generator=g) * 0.5 + 0.05
    A, D = -(torch.rand(H, generator=g) + 0.5), torch.randn(H, generator=g)
    dy = torch.randn(batch, T, H, P, generator=g)
    copies = []
    real_contiguous = torch.Tensor.contiguous

    def counting_contiguous(t, *args, **kwargs):
        if not t.is_contiguous():
            copies.append(tuple(t.shape))
        return real_contiguous(t, *args, **kwargs)

    results = []
    for contiguous in (False, True):
        leaf = xbc.clone().requires_grad_(True)
        x, B, C, _ = torch.split(leaf, [H * P, G * N, G * N, 5], dim=-1)
        x, B, C = x.reshape(batch, T, H, P), B.reshape(batch, T, G, N), C.reshape(batch, T, G, N)
        if contiguous:
            x, B, C = x.contiguous(), B.contiguous(), C.contiguous()
        else:
            assert not (x.is_contiguous() or B.is_contiguous() or C.is_contiguous())
            monkeypatch.setattr(torch.Tensor, "contiguous", counting_contiguous)
        y = chunk_ssd_triton(x, dt, A, B, C, 16, D=D, transpoint=transpoint)
        (y * dy).sum().backward()
        monkeypatch.setattr(torch.Tensor, "contiguous", real_contiguous)
        results.append((y.detach(), leaf.grad))
    assert [s for s in copies if len(s) == 4] == []        # x, B, C [B, T, ., .] were not copied
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_packed_layout_is_built_once_per_index_tensor(monkeypatch):
    """Every layer gets the same seq_idx tensor: the documents are read from it once. Changing
    it in place invalidates the cached layout."""
    inputs = make_inputs(2, 29, 4, 8, 2, 16, torch.float32, init=False)
    seq_idx = torch.tensor([[0] * 10 + [1] * 19, [2] * 29])
    calls = []
    real = chunk_module._documents
    monkeypatch.setattr(chunk_module, "_documents", lambda *a: calls.append(1) or real(*a))

    def ssd(idx):
        return chunk_ssd_triton(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"],
                                16, D=inputs["D"], seq_idx=idx, transpoint=3)

    first, second = ssd(seq_idx), ssd(seq_idx)
    assert len(calls) == 1 and torch.equal(first, second)
    seq_idx[0, 4:10] = 1                                     # another first document length
    moved = ssd(seq_idx)
    assert len(calls) == 2
    reference = chunk_ssd_naive(*(inputs[k].double() for k in ("x", "dt", "A", "B", "C")), 16,
                                D=inputs["D"].double(), seq_idx=seq_idx.clone())
    positions = positions_in_documents([4, 25], 29)
    rows = (positions >= 3)[None, :, None, None]
    assert_close("y row 0", (reference * rows)[0], moved[0].double(), 1e-5)
