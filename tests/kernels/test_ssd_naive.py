"""The chunked SSD reference equals the token-by-token spec, forward and backward (float64)."""
import pytest
import torch
from helpers import assert_close

from transmamba_kernels.ssd.naive import chunk_ssd_naive, ssd_recurrent_naive

F64 = torch.float64
HEADS, HEAD_DIM, STATE_DIM, CHUNK = 4, 3, 5, 16
TOKEN_ARGS = ("x", "dt", "B", "C", "z")  # the [B, T, ...] arguments
GRAD_ARGS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
BOTH_IMPLS = pytest.mark.parametrize("fn", [chunk_ssd_naive, ssd_recurrent_naive], ids=["chunk", "recurrent"])


def make_inputs(
    batch=2,
    seqlen=37,
    groups=1,
    D=None,
    z=False,
    softplus=False,
    dt_limit=None,
    state_rows=None,
    dtype=F64,
):
    """Keyword arguments for both references; D is None, "H" or "HP"; state_rows adds initial_states."""
    kw = {
        "x": torch.randn(batch, seqlen, HEADS, HEAD_DIM, dtype=dtype),
        "A": -(0.5 + 1.5 * torch.rand(HEADS, dtype=dtype)),
        "B": torch.randn(batch, seqlen, groups, STATE_DIM, dtype=dtype),
        "C": torch.randn(batch, seqlen, groups, STATE_DIM, dtype=dtype),
    }
    if softplus:  # softplus(-1 +- noise) ~ 0.3
        kw["dt"] = 0.5 * torch.randn(batch, seqlen, HEADS, dtype=dtype) - 1.0
        kw["dt_bias"] = 0.3 * torch.randn(HEADS, dtype=dtype)
        kw["dt_softplus"] = True
    else:
        kw["dt"] = 0.05 + 0.4 * torch.rand(batch, seqlen, HEADS, dtype=dtype)
    if dt_limit is not None:
        kw["dt_limit"] = dt_limit
    if D == "H":
        kw["D"] = torch.randn(HEADS, dtype=dtype)
    elif D == "HP":
        kw["D"] = torch.randn(HEADS, HEAD_DIM, dtype=dtype)
    if z:
        kw["z"] = torch.randn(batch, seqlen, HEADS, HEAD_DIM, dtype=dtype)
    if state_rows is not None:
        kw["initial_states"] = torch.randn(state_rows, HEADS, HEAD_DIM, STATE_DIM, dtype=dtype)
    for name in GRAD_ARGS:
        if name in kw and dtype.is_floating_point:
            kw[name].requires_grad_(True)
    return kw


def run(fn, kw, chunk_size=CHUNK, **extra):
    """Call a reference, always returning (y, final_states)."""
    if fn is chunk_ssd_naive:
        extra["chunk_size"] = chunk_size
    return fn(**kw, **extra, return_final_states=True)


def grads(kw, outputs, cotangents):
    names = [name for name in GRAD_ARGS if name in kw]
    values = torch.autograd.grad(outputs, [kw[name] for name in names], cotangents, allow_unused=True)
    return dict(zip(names, values))


def assert_same_forward_backward(kw, ref_outputs, outputs, ratio=1e-10):
    for label, ref, out in zip(("y", "final_states"), ref_outputs, outputs):
        assert_close(label, ref, out, ratio)
    cotangents = [torch.randn_like(t) for t in ref_outputs]
    ref_grads = grads(kw, ref_outputs, cotangents)
    out_grads = grads(kw, outputs, cotangents)
    for name, ref in ref_grads.items():
        assert ref is not None and out_grads[name] is not None, f"d{name} missing"
        assert_close(f"d{name}", ref, out_grads[name], ratio)


def token_slice(kw, start, end, row=None):
    """The arguments restricted to tokens [start, end) (and to one batch row)."""
    rows = slice(None) if row is None else slice(row, row + 1)
    return {k: (v[rows, start:end] if k in TOKEN_ARGS else v) for k, v in kw.items()}


CONFIGS = {
    "plain": {},
    "D_z": {"D": "H", "z": True},
    "D_per_channel_softplus": {"D": "HP", "softplus": True},
    "limit": {"dt_limit": (0.15, 0.35)},
    "softplus_limit": {"softplus": True, "dt_limit": (0.2, 0.5)},
    "full": {"D": "H", "z": True, "softplus": True, "dt_limit": (0.2, 0.5), "state_rows": 2},
}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("groups", [1, 2, HEADS])
@pytest.mark.parametrize("seqlen", [1, 7, 63, 100])
def test_chunk_matches_recurrent(seqlen, groups, config):
    kw = make_inputs(seqlen=seqlen, groups=groups, **CONFIGS[config])
    assert_same_forward_backward(kw, run(ssd_recurrent_naive, kw), run(chunk_ssd_naive, kw))


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, 128])
def test_chunk_size_does_not_change_result(chunk_size):
    kw = make_inputs(seqlen=37, groups=2, D="H", z=True, softplus=True, state_rows=2)
    ref = run(ssd_recurrent_naive, kw)
    assert_same_forward_backward(kw, ref, run(chunk_ssd_naive, kw, chunk_size=chunk_size))


def test_return_value_convention():
    kw = make_inputs(seqlen=20)
    y = chunk_ssd_naive(**kw, chunk_size=CHUNK)
    y_rec = ssd_recurrent_naive(**kw)
    assert isinstance(y, torch.Tensor) and isinstance(y_rec, torch.Tensor)
    y, final_states = chunk_ssd_naive(**kw, chunk_size=CHUNK, return_final_states=True)
    assert y.shape == (2, 20, HEADS, HEAD_DIM)
    assert final_states.shape == (2, HEADS, HEAD_DIM, STATE_DIM)


@BOTH_IMPLS
@pytest.mark.parametrize("split", [0, 1, 16, 37, 99, 100])
def test_split_sequence_continues_from_final_state(fn, split):
    """Running [0, t) then [t, T) from the first part's final state equals one run: the
    property the TransMamba memory converter relies on."""
    kw = make_inputs(seqlen=100, groups=2, D="H", z=True, softplus=True, dt_limit=(0.2, 0.5), state_rows=2)
    whole = run(fn, kw)
    y_head, state_head = run(fn, token_slice(kw, 0, split))
    y_tail, state_tail = run(fn, {**token_slice(kw, split, 100), "initial_states": state_head})
    assert_same_forward_backward(kw, whole, (torch.cat([y_head, y_tail], dim=1), state_tail))


def _packed_reference(kw, docs):
    """Run every document (row, start, end) on its own with the recurrent spec."""
    ys, states = {}, []
    for d, (row, start, end) in enumerate(docs):
        doc_kw = token_slice(kw, start, end, row=row)
        if "initial_states" in kw:
            doc_kw["initial_states"] = kw["initial_states"][d : d + 1]
        y, state = run(ssd_recurrent_naive, doc_kw)
        ys.setdefault(row, []).append(y)
        states.append(state)
    y = torch.cat([torch.cat(ys[row], dim=1) for row in sorted(ys)])
    return y, torch.cat(states)


def _seq_idx(lengths_per_row):
    """[rows, T] document id per token from each row's document lengths."""
    rows = [torch.arange(len(lengths)).repeat_interleave(torch.tensor(lengths)) for lengths in lengths_per_row]
    return torch.stack(rows)


@BOTH_IMPLS
@pytest.mark.parametrize("mode", ["cu_seqlens", "seq_idx", "both"])
@pytest.mark.parametrize("lengths", [[5, 40, 1, 54], [16, 16, 68], [100]], ids=["ragged", "aligned", "single"])
@pytest.mark.parametrize("with_states", [True, False], ids=["init", "zero_init"])
def test_packed_documents_equal_separate_runs(fn, mode, lengths, with_states):
    kw = make_inputs(
        batch=1,
        seqlen=sum(lengths),
        groups=2,
        D="H",
        z=True,
        softplus=True,
        state_rows=len(lengths) if with_states else None,
    )
    offsets = [0] + torch.tensor(lengths).cumsum(0).tolist()
    packing = {}
    if mode in ("cu_seqlens", "both"):
        packing["cu_seqlens"] = torch.tensor(offsets, dtype=torch.int32)
    if mode in ("seq_idx", "both"):
        packing["seq_idx"] = _seq_idx([lengths]).int()
    docs = [(0, s, e) for s, e in zip(offsets[:-1], offsets[1:])]
    assert_same_forward_backward(kw, _packed_reference(kw, docs), run(fn, kw, **packing))


@BOTH_IMPLS
def test_seq_idx_packs_each_batch_row(fn):
    rows = [[30, 70], [3, 3, 94]]
    kw = make_inputs(batch=2, seqlen=100, groups=1, D="HP", softplus=True, state_rows=5)
    docs = [(0, 0, 30), (0, 30, 100), (1, 0, 3), (1, 3, 6), (1, 6, 100)]
    assert_same_forward_backward(kw, _packed_reference(kw, docs), run(fn, kw, seq_idx=_seq_idx(rows)))


@BOTH_IMPLS
def test_empty_document_keeps_its_initial_state(fn):
    kw = make_inputs(batch=1, seqlen=30, state_rows=3)
    cu_seqlens = torch.tensor([0, 10, 10, 30])
    y, final_states = run(fn, kw, cu_seqlens=cu_seqlens)
    ref_y, ref_states = _packed_reference(kw, [(0, 0, 10), (0, 10, 10), (0, 10, 30)])
    assert_close("y", ref_y, y, 1e-10)
    assert_close("final_states", ref_states, final_states, 1e-10)
    assert torch.equal(final_states[1], kw["initial_states"][1])


@BOTH_IMPLS
def test_default_dt_limit_does_not_clamp(fn):
    kw = make_inputs(seqlen=20)
    kw["dt"] = kw["dt"].detach() - 0.2  # some raw steps are negative
    default = run(fn, kw)[0]
    assert_close("y", run(fn, kw, dt_limit=(-float("inf"), float("inf")))[0], default, 0.0)
    assert not torch.allclose(run(fn, kw, dt_limit=(0.0, 1e30))[0], default)


@BOTH_IMPLS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, F64])
def test_compute_and_output_dtypes(fn, dtype):
    kw = make_inputs(seqlen=20, D="H", z=True, state_rows=2, dtype=dtype)
    y, final_states = run(fn, kw)
    assert y.dtype == dtype
    assert final_states.dtype == (F64 if dtype == F64 else torch.float32)
    # Lower precisions are upcast on entry, so the result is the float32 one, rounded.
    upcast = {k: (v.detach().float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    y32, final32 = run(fn, upcast)
    assert_close("y", y32.to(dtype), y, 0.0 if dtype != F64 else 1e-6)
    assert_close("final_states", final32.to(final_states.dtype), final_states, 0.0 if dtype != F64 else 1e-6)


def test_matches_huggingface_mamba2_chunk_scan():
    """An independent check: transformers' plain-PyTorch Mamba-2 SSD (computes in float32)."""
    modeling_mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    kw = make_inputs(seqlen=100, groups=2, D="H", softplus=True, dt_limit=(0.2, 0.5), state_rows=2)
    kw = {k: (v.detach().float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref_y, ref_states = modeling_mamba2.mamba2_chunk_scan(
        kw["x"],
        kw["dt"],
        kw["A"],
        kw["B"],
        kw["C"],
        CHUNK,
        D=kw["D"],
        dt_bias=kw["dt_bias"],
        initial_states=kw["initial_states"],
        dt_softplus=True,
        dt_limit=(0.2, 0.5),
        return_final_states=True,
    )
    y, final_states = run(chunk_ssd_naive, kw)
    assert_close("y", ref_y, y, 1e-5)
    assert_close("final_states", ref_states, final_states, 1e-5)


def _bad(batch=2, **changes):
    """Valid inputs (T=10, H=4, G=2) with some arguments replaced."""
    kw = make_inputs(batch=batch, seqlen=10, groups=2)
    kw.update(changes)
    return kw


def _randn(*shape):
    return torch.randn(*shape, dtype=F64)


# case -> (argument the message must name, inputs)
BAD_INPUTS = {
    "x_3d": ("x", lambda: _bad(x=_randn(2, 10, HEADS * HEAD_DIM))),
    "dt_shape": ("dt", lambda: _bad(dt=_randn(2, 10, HEADS + 1))),
    "A_shape": ("A", lambda: _bad(A=_randn(HEADS, 1))),
    "B_seqlen": ("B", lambda: _bad(B=_randn(2, 9, 2, STATE_DIM))),
    "groups_do_not_divide_heads": (
        "B",
        lambda: _bad(B=_randn(2, 10, 3, STATE_DIM), C=_randn(2, 10, 3, STATE_DIM)),
    ),
    "C_differs_from_B": ("C", lambda: _bad(C=_randn(2, 10, 2, STATE_DIM + 1))),
    "D_shape": ("D", lambda: _bad(D=_randn(HEAD_DIM))),
    "z_shape": ("z", lambda: _bad(z=_randn(2, 10, HEADS, HEAD_DIM + 1))),
    "dt_bias_shape": ("dt_bias", lambda: _bad(dt_bias=_randn(HEADS + 1))),
    "dt_limit_not_pair": ("dt_limit", lambda: _bad(dt_limit=(0.1,))),
    "initial_states_shape": (
        "initial_states",
        lambda: _bad(initial_states=_randn(2, HEADS, HEAD_DIM + 1, STATE_DIM)),
    ),
    "initial_states_not_per_document": (
        "initial_states",
        lambda: _bad(seq_idx=_seq_idx([[4, 6], [10]]), initial_states=_randn(2, HEADS, HEAD_DIM, STATE_DIM)),
    ),
    "cu_seqlens_with_batch_2": ("cu_seqlens", lambda: _bad(cu_seqlens=torch.tensor([0, 4, 10]))),
    "cu_seqlens_not_ending_at_T": ("cu_seqlens", lambda: _bad(batch=1, cu_seqlens=torch.tensor([0, 4, 9]))),
    "cu_seqlens_float": ("cu_seqlens", lambda: _bad(batch=1, cu_seqlens=torch.tensor([0.0, 10.0]))),
    "seq_idx_shape": ("seq_idx", lambda: _bad(seq_idx=torch.zeros(2, 9, dtype=torch.long))),
    "seq_idx_decreasing": ("seq_idx", lambda: _bad(seq_idx=_seq_idx([[4, 6], [10]]).flip(1))),
    "seq_idx_disagrees_with_cu_seqlens": (
        "seq_idx",
        lambda: _bad(batch=1, cu_seqlens=torch.tensor([0, 4, 10]), seq_idx=_seq_idx([[5, 5]])),
    ),
}


@BOTH_IMPLS
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_value_error_naming_argument(fn, case):
    argument, build = BAD_INPUTS[case]
    kw = build()
    extra = {"chunk_size": CHUNK} if fn is chunk_ssd_naive else {}
    with pytest.raises(ValueError, match=rf"^{argument}\b") as info:
        fn(**kw, **extra)
    assert "got" in str(info.value), "the message should show the offending shape or value"


@pytest.mark.parametrize("chunk_size", [0, -16, 16.0, True])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match=r"^chunk_size\b"):
        chunk_ssd_naive(**_bad(), chunk_size=chunk_size)
