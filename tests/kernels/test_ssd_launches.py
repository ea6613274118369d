"""Device launches of one SSD forward and one backward: every aten op that runs a kernel
(views and allocations are free) plus one per Triton kernel launch, counted on CPU under
Triton's interpreter. The budget (issue #15): forward 3, backward 4 (5 when G < H) with the
fused chunk backward; the split one (the default: dB/dC and dx/ddt in separate programs, far
fewer registers per program) takes one launch more, 5 (6 when G < H)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("counts interpreter launches", allow_module_level=True)

from launches import count_launches  # noqa: E402
from transmamba_kernels.ssd import chunk as chunk_module  # noqa: E402
from transmamba_kernels.ssd.chunk import chunk_ssd_triton, transmamba_ssd_triton  # noqa: E402

CHUNK_BWD = {"fused": ["triton _chunk_bwd_kernel"],
             "split": ["triton _chunk_bwd_dbc_kernel", "triton _chunk_bwd_dx_kernel"]}


def count(forward, leaves):
    """(forward launches, backward launches) of ``forward()`` and its gradient, as names:
    ``triton <kernel>`` or the aten op."""
    with count_launches() as fwd:
        y = forward()
    dy = torch.randn(y.shape, dtype=y.dtype)
    with count_launches() as bwd:
        torch.autograd.grad(y, leaves, dy)
    names = lambda c: [f"triton {k}" for k in c.triton] + c.aten
    return names(fwd), names(bwd)


def leaves_of(batch, T, H, P, G, N, dtype, param_dtype):
    r = lambda *s, d=dtype: torch.randn(*s).to(d).requires_grad_(True)
    return dict(x=r(batch, T, H, P), dt=r(batch, T, H), dt_bias=r(H, d=param_dtype),
                A_log=r(H, d=param_dtype), B=r(batch, T, G, N), C=r(batch, T, G, N),
                D=r(H, d=param_dtype))


@pytest.mark.parametrize("dtype,param_dtype,G", [(torch.float32, torch.float32, 2),
                                                 (torch.bfloat16, torch.float32, 2),
                                                 (torch.float16, torch.bfloat16, 2),
                                                 (torch.float32, torch.float32, 1)])
@pytest.mark.parametrize("design", ["split", "fused"])
@pytest.mark.parametrize("passing", ["serial", "tiled"])
def test_mixer_entry_launches(dtype, param_dtype, G, design, passing, monkeypatch):
    monkeypatch.setitem(chunk_module.DESIGN, "chunk_bwd", design)
    monkeypatch.setitem(chunk_module.DESIGN, "passing", passing)
    suffix = "_tiled" if passing == "tiled" else ""
    t = leaves_of(1, 20, 2, 8, G, 16, dtype, param_dtype)
    fwd, bwd = count(lambda: transmamba_ssd_triton(
        t["x"], t["dt"], t["dt_bias"], t["A_log"], t["B"], t["C"], t["D"], 16, 3,
        dt_limit=(0.01, 5.0)), list(t.values()))
    assert fwd == ["triton _chunk_state_fwd_kernel", f"triton _state_passing_fwd{suffix}_kernel",
                   "triton _chunk_scan_fwd_kernel"], fwd
    expected = ["triton _chunk_state_bwd_kernel", f"triton _state_passing_bwd{suffix}_kernel",
                *CHUNK_BWD[design], "triton _ssd_finalize_kernel"]
    if G < 2:
        expected.append("triton _group_sum_kernel")
    assert bwd == expected, bwd


def test_mamba_style_entry_launches():
    """chunk_ssd_triton (A, dt_bias, softplus, D [H, P], initial and final states): the same
    three and five launches."""
    t = leaves_of(2, 37, 2, 8, 2, 16, torch.float32, torch.float32)
    D = torch.randn(2, 8, requires_grad=True)
    init = torch.randn(2, 2, 8, 16, requires_grad=True)
    A = -torch.rand(2, requires_grad=True)
    leaves = [t["x"], t["dt"], A, t["B"], t["C"], D, t["dt_bias"], init]

    def forward():
        y, final = chunk_ssd_triton(t["x"], t["dt"], A, t["B"], t["C"], 16, D=D,
                                    dt_bias=t["dt_bias"], initial_states=init, dt_softplus=True,
                                    return_final_states=True, transpoint=5)
        return y

    fwd, bwd = count(forward, leaves)
    assert len(fwd) == 3 and len(bwd) == 5, (fwd, bwd)
