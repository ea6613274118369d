"""Triton chunked SSD scan (Mamba-2) with a TransPoint: forward and backward as custom ops.

Same function as ``naive.chunk_ssd_naive`` (Dao & Gu 2024, section 6; DESIGN section 5), over
chunks of L tokens with Lam_t = sum of A*dt_r from the chunk start to t (inclusive), computed
in the chunk-parallel order of mamba_ssm (kernels in ``chunk_kernels.py``):

  chunk state    U_c   = sum_s exp(Lam_end - Lam_s) dt_s x_s (x) B_s    [P, N], all chunks at once
  state passing  S_c+1 = exp(Lam_end,c) S_c + U_c   (S_0 = initial)     elementwise over [P, N]
  chunk scan     y_t   = sum_{s<=t} exp(Lam_t - Lam_s) (C_t . B_s) dt_s x_s
                         + exp(Lam_t) S_c C_t + D x_t                   t >= transpoint

The backward mirrors it: V_c = sum_{t>=p} exp(Lam_t) dy_t (x) C_t per chunk in parallel, the
reverse state passing dS_c = exp(Lam_end,c) dS_c+1 + V_c, then the chunk backward: dB and dC
per N block with their dLam shares, then dx and dt (with the reverse in-chunk cumsum of dLam
and the softplus/bias chain), and one small kernel that sums the per-chunk partials of dA, dD and d dt_bias in a fixed order.
TransMamba (arXiv 2503.24067): tokens before the TransPoint p belong to attention, so their
outputs are never computed (chunks that end before p only zero their rows) while their states
are, which is the Memory Converter fused into the scan. The backward can add attention's
gradients of those prefix tokens into dx, dB and dC (``ssd_backward``).
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch.utils.weak import WeakIdKeyDictionary

from ..custom_op import custom_op
from .chunk_kernels import (_INTERPRET, _chunk_bwd_dbc_kernel, _chunk_bwd_dx_kernel,
                            _chunk_bwd_kernel, _chunk_scan_fwd_kernel, _chunk_state_bwd_kernel,
                            _chunk_state_fwd_kernel, _group_sum_kernel, _ssd_finalize_kernel,
                            _state_passing_bwd_kernel, _state_passing_bwd_tiled_kernel,
                            _state_passing_fwd_kernel, _state_passing_fwd_tiled_kernel)
from ..reference.ssd import _check_initial_states, _check_inputs, _documents

__all__ = ["chunk_ssd_triton", "transmamba_ssd_triton", "ssd_forward", "ssd_backward"]

_NO_LIMIT = (0.0, math.inf)
Tensor = torch.Tensor

# The designs the launchers run, read at each call, so a benchmark can time both in one process
# (tools/bench/bench_ssd.py --kernels):
#   passing:   "tiled" (several chunks per dependent step, an associative scan; not with packed
#              documents, which always run "serial") or "serial" (one chunk per step);
#   chunk_bwd: "split" (dB/dC programs per N block, then dx/ddt programs: one launch more) or
#              "fused" (one program per chunk and head computes dx, dB, dC and ddt).
# One H200, 2026-12-02 (bench_ssd.py --kernels, CUDA-graph times): serial passing beats tiled
# (training shape forward 0.036 vs 0.082 ms, backward 0.079 vs 0.095; 64k tokens 0.364 vs
# 0.958 and 0.495 vs 1.117) and split beats fused (0.133 + 0.086 vs 0.281 ms; 64k tokens
# 1.055 + 0.737 vs 2.692).
DESIGN = {"passing": "serial", "chunk_bwd": "split"}


def _interpreter_blocks(kernel: str, P: int, N: int) -> dict:
    """The block sizes the interpreter runs (on GPUs the autotuner picks them): the head and
    state dimensions rounded up to a power of two, at most 64 (the chunk-state kernels) or 64
    for P and whole N (the chunk kernels). Tests monkeypatch this to cover other tilings."""
    bp = min(64, max(16, triton.next_power_of_2(P)))
    if kernel in ("states", "dbc"):
        return {"BLOCK_P": bp, "BLOCK_N": min(64, max(16, triton.next_power_of_2(N)))}
    return {"BLOCK_P": bp}


def _launch_blocks(kernel: str, P: int, N: int) -> dict:
    """Block-size arguments a launcher passes: none on GPUs (tuned), explicit in the interpreter."""
    return _interpreter_blocks(kernel, P, N) if _INTERPRET else {}


def _chosen(kernel, name: str, explicit: dict, smallest: int) -> int:
    """The block size ``name`` the last launch of ``kernel`` ran with: the launcher's explicit
    one, else the autotuner's choice (``smallest`` when no choice was made, as under
    tools/check_gpu_compile.py, which intercepts the autotuner)."""
    if name in explicit:
        return explicit[name]
    config = getattr(kernel, "best_config", None)
    return config.kwargs[name] if config is not None else smallest


def _passing_chunks(num_chunks: int) -> int:
    """Chunks per dependent step of the tiled state passing: 16 (8 steps at 128 chunks, a
    [16, 256] tile of states per step). Tests monkeypatch it to force several steps."""
    return min(16, max(2, triton.next_power_of_2(num_chunks)))


def _passing_block(PN: int) -> int:
    """Elements of the flattened [P, N] state per state-passing program. Not tuned: the
    backward's chunk-end decay partials are one per block, and the chunk backward must know
    how many. 256 gives B*H*PN/256 programs (576 at the training shape)."""
    return min(256, max(16, triton.next_power_of_2(PN)))


def _rows(t: Tensor) -> Tensor:
    """``t`` [B, T, heads, dim] as the kernels read it: any batch and token strides (e.g. x, B
    and C as views into the mixer's conv output), heads and dim packed. Copies otherwise."""
    if t.stride(3) == 1 and t.stride(2) == t.shape[3]:
        return t
    return t.contiguous()


def _heads_packed(dt: Tensor) -> Tensor:
    """dt [B, T, H] with any batch and token strides, heads packed. Copies otherwise."""
    return dt if dt.stride(2) == 1 else dt.contiguous()


def _row_strides(*tensors: Tensor) -> list[int]:
    """The batch and token strides of each tensor, in the kernels' argument order."""
    return [stride for t in tensors for stride in (t.stride(0), t.stride(1))]


def _grid_bucket(batch: int, heads: int, num_chunks: int) -> int:
    """The autotuning key's measure of grid size (``ROWS``): batch * heads * chunks rounded up
    to a power of two."""
    return triton.next_power_of_2(batch * heads * num_chunks)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the per-chunk states U/S and state gradients V/dS kept between the kernels:
    the input dtype for bf16/fp16 (the dots read them cast to it anyway), float32 for float32
    inputs. Recurrences always accumulate in float32 registers."""
    return torch.float32 if dtype == torch.float32 else dtype


def _num_chunks(T: int, L: int) -> int:
    return max(1, triton.cdiv(T, L))


def _dt_flags(dt_bias, a_is_log, dt_softplus, lo, hi) -> dict:
    """The compile-time switches of the in-kernel dt processing (``_chunk_dt``)."""
    return dict(HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
                HAS_LIMIT=(lo, hi) != _NO_LIMIT, A_LOG=a_is_log)


def _ssd_fwd(x, dt, dt_bias, A, B, C, D, initial_states, chunk_size, transpoint, a_is_log,
             dt_softplus, lo, hi, chunk_doc, chunk_flags, pos, num_docs):
    """Three launches: chunk states, state passing, chunk scan. Returns y [B,T,H,P] (x's
    dtype), final [B or num_docs, H, P, N] float32, states [B, NC, H, P, N] (the state entering
    each chunk) and decay [B, NC, H] float32 (Lam_end of each chunk)."""
    batch, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    L = chunk_size
    NC = _num_chunks(T, L)
    x, B, C, dt = _rows(x), _rows(B), _rows(C), _heads_packed(dt)
    packed = chunk_doc is not None
    ieee = x.dtype == torch.float32
    flags = _dt_flags(dt_bias, a_is_log, dt_softplus, lo, hi)
    bias = dt_bias if dt_bias is not None else dt
    init = initial_states.contiguous() if initial_states is not None else None
    rows_bucket = _grid_bucket(batch, H, NC)
    states = torch.empty(batch, NC, H, P, N, dtype=_state_dtype(x.dtype), device=x.device)
    decay = torch.empty(batch, NC, H, dtype=torch.float32, device=x.device)
    state_grid = lambda meta: (NC * triton.cdiv(P, meta["BLOCK_P"]) * triton.cdiv(N, meta["BLOCK_N"]), batch * H)
    _chunk_state_fwd_kernel[state_grid](
        x, B, dt, bias, A, states, decay, T, rows_bucket, H, G, P, N, NC, *_row_strides(x, B, dt), lo, hi,
        L=L, IEEE=ieee, **flags, **_launch_blocks("states", P, N))
    if not packed:
        final = torch.empty(batch, H, P, N, dtype=torch.float32, device=x.device)
    else:  # an empty document's final state is its initial state: the kernels never visit it
        final = init.float().clone() if init is not None else torch.zeros(
            num_docs, H, P, N, dtype=torch.float32, device=x.device)
    block = _passing_block(P * N)
    passing_grid = (batch * H, triton.cdiv(P * N, block))
    if packed or DESIGN["passing"] == "serial":
        _state_passing_fwd_kernel[passing_grid](
            states, decay, init if init is not None else final, final,
            chunk_doc if packed else decay, chunk_flags if packed else decay, H, P * N, NC,
            BLOCK=block, HAS_INIT=init is not None, PACKED=packed)
    else:
        _state_passing_fwd_tiled_kernel[passing_grid](
            states, decay, init if init is not None else final, final, H, P * N, NC,
            BLOCK=block, CHUNKS=_passing_chunks(NC), HAS_INIT=init is not None)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grid = lambda meta: (NC * triton.cdiv(P, meta["BLOCK_P"]), batch * H)
    _chunk_scan_fwd_kernel[grid](
        x, B, C, dt, bias, A, D if D is not None else A, states, y, pos if packed else decay,
        T, rows_bucket, H, G, P, N, NC, transpoint, *_row_strides(x, B, C, dt), lo, hi, L=L,
        BLOCK_N=max(16, triton.next_power_of_2(N)), HAS_D=D is not None,
        D_PER_P=D is not None and D.dim() == 2, PACKED=packed, IEEE=ieee, **flags,
        **_launch_blocks("chunk", P, N))
    return y, final, states, decay


def _check_prefix(name, grad, shape):
    if grad is not None and tuple(grad.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)} (rows before the TransPoint), "
                         f"got {tuple(grad.shape)}")


def _ssd_bwd(dy, dfinal, x, dt, dt_bias, A, B, C, D, initial_states, states, final, decay,
             chunk_size, transpoint, a_is_log, dt_softplus, lo, hi, prefix_dx, prefix_dB,
             prefix_dC, chunk_doc, chunk_flags, pos, num_docs):
    """Five launches (six when G < H; one fewer with the fused chunk backward): V_c per chunk,
    reverse state passing, chunk backward (dB/dC, then dx/ddt), finalize (and the group sum of
    dB, dC). Returns dx, d dt (raw), d dt_bias, dA (or
    dA_log), dB, dC, dD, d initial_states, each in its input's dtype; absent inputs get an
    empty tensor."""
    batch, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    L = chunk_size
    NC = states.shape[1]
    packed = chunk_doc is not None
    x, B, C, dt, dy = _rows(x), _rows(B), _rows(C), _heads_packed(dt), _rows(dy)
    rows_before = (batch, min(max(transpoint, 0), T))
    _check_prefix("prefix_dx", prefix_dx, (*rows_before, H, P))
    _check_prefix("prefix_dB", prefix_dB, (*rows_before, G, N))
    _check_prefix("prefix_dC", prefix_dC, (*rows_before, G, N))
    if packed and any(g is not None for g in (prefix_dx, prefix_dB, prefix_dC)):
        raise ValueError("prefix gradients are not supported with packed documents")
    pdx = _rows(prefix_dx) if prefix_dx is not None else x
    pdb = _rows(prefix_dB) if prefix_dB is not None else B
    pdc = _rows(prefix_dC) if prefix_dC is not None else C
    ieee = x.dtype == torch.float32
    flags = _dt_flags(dt_bias, a_is_log, dt_softplus, lo, hi)
    bias = dt_bias if dt_bias is not None else dt
    rows_bucket = _grid_bucket(batch, H, NC)
    dstates = torch.empty_like(states)
    state_grid = lambda meta: (NC * triton.cdiv(P, meta["BLOCK_P"]) * triton.cdiv(N, meta["BLOCK_N"]), batch * H)
    _chunk_state_bwd_kernel[state_grid](
        dy, C, dt, bias, A, dstates, pos if packed else decay, T, rows_bucket, H, G, P, N, NC, transpoint,
        *_row_strides(dy, C, dt), lo, hi, L=L, PACKED=packed, IEEE=ieee, **flags,
        **_launch_blocks("states", P, N))

    block = _passing_block(P * N)
    num_blocks = triton.cdiv(P * N, block)
    dlam_end = torch.empty(batch, NC, H, num_blocks, dtype=torch.float32, device=x.device)
    dinit = None
    if initial_states is not None and not packed:
        dinit = torch.empty(initial_states.shape, dtype=initial_states.dtype, device=x.device)
    elif initial_states is not None:  # an empty document passes its final-state gradient on
        dinit = (dfinal.to(initial_states.dtype, copy=True) if dfinal is not None
                 else torch.zeros_like(initial_states))
    dfin = dfinal.contiguous() if dfinal is not None else None
    if packed or DESIGN["passing"] == "serial":
        _state_passing_bwd_kernel[(batch * H, num_blocks)](
            dstates, states, final, decay, dfin if dfin is not None else final,
            dinit if dinit is not None else final, dlam_end, chunk_doc if packed else decay,
            chunk_flags if packed else decay, H, P * N, NC, num_blocks, BLOCK=block,
            HAS_DFINAL=dfin is not None, HAS_DINIT=dinit is not None, PACKED=packed)
    else:
        _state_passing_bwd_tiled_kernel[(batch * H, num_blocks)](
            dstates, states, final, decay, dfin if dfin is not None else final,
            dinit if dinit is not None else final, dlam_end, H, P * N, NC, num_blocks,
            BLOCK=block, CHUNKS=_passing_chunks(NC), HAS_DFINAL=dfin is not None,
            HAS_DINIT=dinit is not None)

    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    # One group per head: the per-head gradients are the answer, written in B's dtype.
    per_head_dtype = B.dtype if G == H else torch.float32
    db = torch.empty(batch, T, H, N, dtype=per_head_dtype, device=x.device)
    dc = torch.empty(batch, T, H, N, dtype=per_head_dtype, device=x.device)
    ddt = torch.empty(batch, T, H, dtype=dt.dtype, device=x.device)
    da_part = torch.empty(batch * NC, H, dtype=torch.float32, device=x.device)
    dbias_part = torch.empty(batch * NC, H, dtype=torch.float32, device=x.device) if dt_bias is not None else da_part
    dd_part = torch.empty(batch * NC, H, P, dtype=torch.float32, device=x.device) if D is not None else da_part
    D_arg, pos_arg = D if D is not None else A, pos if packed else decay
    d_flags = dict(HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2)
    block_e = triton.next_power_of_2(num_blocks)
    if DESIGN["chunk_bwd"] == "fused":
        _chunk_bwd_kernel[(NC, batch * H)](
            x, B, C, dt, bias, A, D_arg, states, dstates, dlam_end, dy, pdx, pdb, pdc, dx, db, dc,
            ddt, da_part, dbias_part, dd_part, pos_arg, T, rows_bucket, H, G, P, N, NC, transpoint,
            num_blocks, *_row_strides(x, B, C, dt, dy, pdx, pdb, pdc), lo, hi, L=L,
            BLOCK_N=max(16, triton.next_power_of_2(N)), BLOCK_E=block_e,
            HAS_PDX=prefix_dx is not None, HAS_PDB=prefix_dB is not None,
            HAS_PDC=prefix_dC is not None, PACKED=packed, IEEE=ieee, **d_flags, **flags,
            **_launch_blocks("chunk", P, N))
    else:
        blocks = _launch_blocks("dbc", P, N)
        # One dLam partial [L] per (chunk, head, program); room for the smallest BLOCK_N (32).
        dlam_part = torch.empty(batch * NC * H, 2 * triton.cdiv(N, blocks.get("BLOCK_N", 32)), L,
                                dtype=torch.float32, device=x.device)
        _chunk_bwd_dbc_kernel[lambda meta: (NC * 2 * triton.cdiv(N, meta["BLOCK_N"]), batch * H)](
            x, B, C, dt, bias, A, states, dstates, dy, pdb, pdc, db, dc, dlam_part, pos_arg,
            T, rows_bucket, H, G, P, N, NC, transpoint, *_row_strides(x, B, C, dt, dy, pdb, pdc),
            lo, hi, L=L, PDB=int(prefix_dB is not None), PDC=int(prefix_dC is not None),
            PACKED=packed, IEEE=ieee, **flags, **blocks)
        num_parts = 2 * triton.cdiv(N, _chosen(_chunk_bwd_dbc_kernel, "BLOCK_N", blocks, 32))
        _chunk_bwd_dx_kernel[(NC, batch * H)](
            x, B, C, dt, bias, A, D_arg, dstates, dlam_end, dlam_part, dy, pdx, dx, ddt, da_part,
            dbias_part, dd_part, pos_arg, T, rows_bucket, H, G, P, N, NC, transpoint, num_blocks,
            num_parts, *_row_strides(x, B, C, dt, dy, pdx), lo, hi, L=L,
            BLOCK_N=max(16, triton.next_power_of_2(N)), BLOCK_E=block_e,
            BLOCK_Q=triton.next_power_of_2(num_parts), HAS_PDX=prefix_dx is not None,
            PACKED=packed, IEEE=ieee, **d_flags, **flags, **_launch_blocks("chunk", P, N))

    dA = torch.empty(A.shape, dtype=A.dtype, device=x.device)
    dbias = torch.empty(H, dtype=dt_bias.dtype, device=x.device) if dt_bias is not None else None
    dD = torch.empty(D.shape, dtype=D.dtype, device=x.device) if D is not None else None
    _ssd_finalize_kernel[(H,)](
        da_part, dbias_part, dd_part, A, dA, dbias if dbias is not None else dA,
        dD if dD is not None else dA, batch * NC, H, P,
        BLOCK_R=min(128, triton.next_power_of_2(batch * NC)), BLOCK_P=min(64, triton.next_power_of_2(P)),
        A_LOG=a_is_log, HAS_BIAS=dt_bias is not None, HAS_D=D is not None,
        D_PER_P=D is not None and D.dim() == 2)
    if G == H:
        dB, dC = db, dc
    else:
        dB = torch.empty(batch, T, G, N, dtype=B.dtype, device=x.device)
        dC = torch.empty(batch, T, G, N, dtype=C.dtype, device=x.device)
        _group_sum_kernel[(batch * T, G)](db, dc, dB, dC, H, G, N,
                                          BLOCK_N=max(16, triton.next_power_of_2(N)))
    empty = lambda: x.new_empty(0)
    return (dx, ddt, dbias if dbias is not None else empty(), dA, dB, dC,
            dD if dD is not None else empty(), dinit if dinit is not None else empty())


# The custom ops: opaque to torch.compile (fullgraph traces through them by their fake
# implementations), with int/float/bool arguments only. Packed documents pass their layout as
# three index tensors and the document count.

@custom_op("transmamba::ssd_fwd")
def ssd_fwd(x: Tensor, dt: Tensor, dt_bias: Optional[Tensor], A: Tensor, B: Tensor, C: Tensor,
            D: Optional[Tensor], initial_states: Optional[Tensor], chunk_size: int,
            transpoint: int, a_is_log: bool, dt_softplus: bool, dt_limit_min: float,
            dt_limit_max: float, chunk_doc: Optional[Tensor] = None,
            chunk_flags: Optional[Tensor] = None, positions: Optional[Tensor] = None,
            num_docs: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``transmamba::ssd_fwd``: (y [B,T,H,P], final [B or num_docs,H,P,N] float32,
    states [B,NC,H,P,N], decay [B,NC,H] float32); see ``_ssd_fwd``."""
    return _ssd_fwd(x, dt, dt_bias, A, B, C, D, initial_states, chunk_size, transpoint, a_is_log,
                    dt_softplus, dt_limit_min, dt_limit_max, chunk_doc, chunk_flags, positions,
                    num_docs)


@ssd_fwd.register_fake
def _ssd_fwd_fake(x, dt, dt_bias, A, B, C, D, initial_states, chunk_size, transpoint, a_is_log,
                  dt_softplus, dt_limit_min, dt_limit_max, chunk_doc=None, chunk_flags=None,
                  positions=None, num_docs=0):
    batch, T, H, P = x.shape
    N = B.shape[3]
    NC = _num_chunks(T, chunk_size)
    rows = num_docs if chunk_doc is not None else batch
    return (x.new_empty(x.shape), x.new_empty(rows, H, P, N, dtype=torch.float32),
            x.new_empty(batch, NC, H, P, N, dtype=_state_dtype(x.dtype)),
            x.new_empty(batch, NC, H, dtype=torch.float32))


@custom_op("transmamba::ssd_bwd")
def ssd_bwd(dy: Tensor, dfinal: Optional[Tensor], x: Tensor, dt: Tensor, dt_bias: Optional[Tensor],
            A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], initial_states: Optional[Tensor],
            states: Tensor, final: Tensor, decay: Tensor, chunk_size: int, transpoint: int,
            a_is_log: bool, dt_softplus: bool, dt_limit_min: float, dt_limit_max: float,
            prefix_dx: Optional[Tensor] = None, prefix_dB: Optional[Tensor] = None,
            prefix_dC: Optional[Tensor] = None, chunk_doc: Optional[Tensor] = None,
            chunk_flags: Optional[Tensor] = None, positions: Optional[Tensor] = None,
            num_docs: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``transmamba::ssd_bwd``: (dx, d dt, d dt_bias, dA, dB, dC, dD, d initial_states);
    see ``_ssd_bwd``."""
    return _ssd_bwd(dy, dfinal, x, dt, dt_bias, A, B, C, D, initial_states, states, final, decay,
                    chunk_size, transpoint, a_is_log, dt_softplus, dt_limit_min, dt_limit_max,
                    prefix_dx, prefix_dB, prefix_dC, chunk_doc, chunk_flags, positions, num_docs)


@ssd_bwd.register_fake
def _ssd_bwd_fake(dy, dfinal, x, dt, dt_bias, A, B, C, D, initial_states, *args, **kwargs):
    like = lambda t: t.new_empty(t.shape) if t is not None else x.new_empty(0)
    return (x.new_empty(x.shape), like(dt), like(dt_bias), like(A), B.new_empty(B.shape),
            C.new_empty(C.shape), like(D), like(initial_states))


def _ssd_fwd_setup(ctx, inputs, output):
    (x, dt, dt_bias, A, B, C, D, initial_states, chunk_size, transpoint, a_is_log, dt_softplus,
     lo, hi, chunk_doc, chunk_flags, positions, num_docs) = inputs
    _y, final, states, decay = output
    ctx.save_for_backward(x, dt, dt_bias, A, B, C, D, initial_states, states, final, decay,
                          chunk_doc, chunk_flags, positions)
    ctx.args = (chunk_size, transpoint, a_is_log, dt_softplus, lo, hi)
    ctx.num_docs = num_docs
    ctx.mark_non_differentiable(states, decay)
    ctx.set_materialize_grads(False)     # no zero-filled gradients for states/decay (no launches)


def _ssd_fwd_backward(ctx, dy, dfinal, _dstates, _ddecay):
    (x, dt, dt_bias, A, B, C, D, initial_states, states, final, decay, chunk_doc, chunk_flags,
     positions) = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    dx, ddt, dbias, dA, dB, dC, dD, dinit = ssd_bwd(
        dy, dfinal, x, dt, dt_bias, A, B, C, D, initial_states, states, final, decay, *ctx.args,
        None, None, None, chunk_doc, chunk_flags, positions, ctx.num_docs)
    return (dx, ddt, dbias if dt_bias is not None else None, dA, dB, dC,
            dD if D is not None else None, dinit if initial_states is not None else None,
            None, None, None, None, None, None, None, None, None, None)


ssd_fwd.register_autograd(_ssd_fwd_backward, setup_context=_ssd_fwd_setup)


@dataclass
class _PackedLayout:
    """Packed documents laid out one after another in a single row, each padded to whole
    chunks, so no chunk spans two documents: a document's chunks start from its own initial
    state, and its TransPoint counts from its own first token."""

    src: torch.Tensor          # [tokens] flat index row * T + t of each token, document by document
    dst: torch.Tensor          # [tokens] where that token sits in the padded row
    chunk_doc: torch.Tensor    # [num_chunks] int32 document of each chunk
    chunk_flags: torch.Tensor  # [num_chunks] int32: 1 = first chunk of its document, 2 = last
    pos: torch.Tensor          # [padded_len] int32 position of each slot inside its document
    num_docs: int
    padded_len: int

    def arrays(self):
        return self.chunk_doc, self.chunk_flags, self.pos

    @staticmethod
    def build(docs, seqlen: int, L: int, device) -> "_PackedLayout":
        src, dst, pos, chunk_doc, flags = [], [], [], [], []
        offset = 0
        for d, doc in enumerate(docs):
            length = doc.end - doc.start
            if length == 0:
                continue
            chunks = triton.cdiv(length, L)
            src.append(torch.arange(doc.start, doc.end) + doc.row * seqlen)
            dst.append(torch.arange(offset, offset + length))
            pos.append(torch.arange(chunks * L))
            chunk_doc += [d] * chunks
            flags += [1] + [0] * (chunks - 1)
            flags[-1] |= 2
            offset += chunks * L
        as_long = lambda parts: (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)).to(device)
        as_int = lambda v: torch.tensor(v, dtype=torch.int32, device=device)
        return _PackedLayout(as_long(src), as_long(dst), as_int(chunk_doc), as_int(flags),
                             as_long(pos).to(torch.int32), len(docs), offset)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [1, padded_len, ...] with zeros in the padding (dt = 0 keeps states)."""
        flat = t.reshape(-1, *t.shape[2:])
        out = t.new_zeros(self.padded_len, *t.shape[2:])
        return out.index_copy(0, self.dst, flat.index_select(0, self.src)).unsqueeze(0)

    def unpack(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """[1, padded_len, ...] -> the [B, T, ...] shape of ``like``."""
        rows = t[0].index_select(0, self.dst)
        out = t.new_zeros(like.shape[0] * like.shape[1], *t.shape[2:])
        return out.index_copy(0, self.src, rows).view(*like.shape[:2], *t.shape[2:])


# The packed layout of each seq_idx / cu_seqlens tensor: a model passes the same tensor to every
# layer, so the documents are read from the device (host syncs) and laid out once, not per call.
_LAYOUTS = WeakIdKeyDictionary()


def _packed_layout(dims, seq_idx, cu_seqlens, chunk_size: int, device):
    """(documents, ``_PackedLayout``) of the packed documents, cached per index tensor while it
    is not modified in place (its version counter)."""
    if seq_idx is not None and cu_seqlens is not None:         # not cached: both describe it
        docs = _documents(dims, seq_idx, cu_seqlens)
        return docs, _PackedLayout.build(docs, dims.seqlen, chunk_size, device)
    index = seq_idx if seq_idx is not None else cu_seqlens
    key = (dims.batch, dims.seqlen, chunk_size, str(device), seq_idx is not None)
    cached = _LAYOUTS.get(index, {}).get(key)
    if cached is not None and cached[0] == index._version:
        return cached[1], cached[2]
    docs = _documents(dims, seq_idx, cu_seqlens)
    layout = _PackedLayout.build(docs, dims.seqlen, chunk_size, device)
    _LAYOUTS.setdefault(index, {})[key] = (index._version, docs, layout)
    return docs, layout


def _limits(dt_limit) -> tuple[float, float]:
    lo, hi = dt_limit
    return (float(lo) if lo is not None else 0.0, float(hi) if hi is not None else math.inf)


def transmamba_ssd_triton(x, dt, dt_bias, A_log, B, C, D, chunk_size, transpoint,
                          dt_limit=_NO_LIMIT):
    """The mixer's SSD: y [B, T, H, P] in x's dtype, differentiable in every tensor argument.

    Args:
        x: [B, T, H, P]; B, C: [B, T, G, N] with G dividing H. Any batch and token strides
            (views into one conv output are read in place); the last two dims packed.
        dt: [B, T, H] raw, before the bias and softplus (both always applied in-kernel, then
            the dt_limit clamp unless it is (0, inf)); any batch and token strides.
        dt_bias: [H]; A_log: [H] (A = -exp(A_log)); D: [H] or [H, P] or None. Any float dtype;
            each gradient comes back in its input's dtype.
        chunk_size: a power of two >= 16. transpoint: outputs only for t >= transpoint.

    Three launches forward and five backward (six when G < H; four and five with the fused
    chunk backward, ``DESIGN["chunk_bwd"] = "fused"``). Traceable by
    ``torch.compile(fullgraph=True)`` (custom ops ``transmamba::ssd_fwd`` / ``ssd_bwd``).
    """
    lo, hi = _limits(dt_limit)
    return ssd_fwd(x, dt, dt_bias, A_log, B, C, D, None, int(chunk_size), int(transpoint), True,
                   True, lo, hi)[0]


def ssd_forward(x, dt, dt_bias, A_log, B, C, D, chunk_size, transpoint, dt_limit=_NO_LIMIT):
    """``transmamba_ssd_triton`` without autograd, for an ``autograd.Function`` that splices
    attention on the prefix t < transpoint with this SSD. Returns (y [B,T,H,P], saved) with
    saved = (states [B,NC,H,P,N], final [B,H,P,N] float32, decay [B,NC,H] float32), which
    ``ssd_backward`` takes back. Both are custom ops: torch.compile traces them."""
    lo, hi = _limits(dt_limit)
    y, final, states, decay = ssd_fwd(
        x, dt, dt_bias, A_log, B, C, D, None, int(chunk_size), int(transpoint), True, True, lo, hi)
    return y, (states, final, decay)


def ssd_backward(dy, x, dt, dt_bias, A_log, B, C, D, saved, chunk_size, transpoint,
                 dt_limit=_NO_LIMIT, prefix_dx=None, prefix_dB=None, prefix_dC=None):
    """Gradients of ``ssd_forward``'s y, with attention's gradients of the prefix tokens added
    inside the kernels (no extra launches):

        prefix_dx [B, p, H, P], prefix_dB / prefix_dC [B, p, G, N], p = min(transpoint, T),
        any batch and token strides, each may be None: added to dx, dB, dC at rows t < p.
        The SSD never reads C at rows t < p, so dC there is exactly prefix_dC (or zero).

    Returns (dx, d dt, d dt_bias, dA_log, dB, dC, dD) in the inputs' dtypes (dD None if D is).
    """
    states, final, decay = saved
    lo, hi = _limits(dt_limit)
    dx, ddt, dbias, dA_log, dB, dC, dD, _ = ssd_bwd(
        dy, None, x, dt, dt_bias, A_log, B, C, D, None, states, final, decay, int(chunk_size),
        int(transpoint), True, True, lo, hi, prefix_dx, prefix_dB, prefix_dC)
    return dx, ddt, dbias, dA_log, dB, dC, dD if D is not None else None


def chunk_ssd_triton(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                     seq_idx=None, cu_seqlens=None, dt_softplus=False,
                     dt_limit=(0.0, float("inf")), return_final_states=False, transpoint=0):
    """Chunked SSD scan in Triton; ``naive.chunk_ssd_naive`` is its specification.

    Args (mamba_ssm's ``mamba_chunk_scan_combined`` convention):
        x: [B, T, H, P]; dt: [B, T, H]; A: [H]; B, C: [B, T, G, N] with G dividing H;
        D: [H] or [H, P]; z: [B, T, H, P]; dt_bias: [H]; initial_states: [B, H, P, N];
        chunk_size: a power of two >= 16.
        transpoint: TransMamba's TransPoint p: outputs are computed only for tokens t >= p
            (rows t < p are zero); states still cover every token, so the state entering
            token p is the Memory Converter's. With packed documents p counts from each
            document's first token.
        seq_idx [B, T] / cu_seqlens [num_docs + 1] (batch 1): packed documents; the state
            resets at each document start, initial_states is then [num_docs, H, P, N] and the
            final states are one per document.

    Returns:
        y [B, T, H, P] in x's dtype, and the final state [B, H, P, N] (float32) when
        ``return_final_states``. Differentiable in x, dt, A, B, C, D, z, dt_bias, initial_states.

    Without documents and z: three launches forward and five backward (six when G < H),
    traceable by torch.compile. Packed documents are eager-only: the layout is read from the
    host, dt is processed and the inputs packed into whole chunks in PyTorch. z multiplies
    the output in PyTorch.
    """
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size={chunk_size}: the Triton SSD needs a power of two >= 16")
    dims = _check_inputs(x, dt, A, B, C, D, z, dt_bias, dt_limit)
    packed = seq_idx is not None or cu_seqlens is not None
    if packed:
        docs, layout = _packed_layout(dims, seq_idx, cu_seqlens, int(chunk_size), x.device)
    else:
        docs = _documents(dims, seq_idx, cu_seqlens)
    _check_initial_states(initial_states, dims, len(docs), packed)
    if x.dtype == torch.float64:
        raise TypeError("chunk_ssd_triton: float64 is not supported (use chunk_ssd_naive)")
    lo, hi = _limits(dt_limit)
    if not packed:
        y, final, _, _ = ssd_fwd(x, dt, dt_bias, A, B, C, D, initial_states, int(chunk_size),
                                 int(transpoint), False, bool(dt_softplus), lo, hi)
    else:
        H, P = dims.heads, dims.head_dim
        if layout.padded_len == 0:  # only empty documents
            y = torch.zeros_like(x)
            final = (initial_states.float().clone() if initial_states is not None else
                     torch.zeros(len(docs), H, P, dims.state_dim, device=x.device))
        else:  # dt processed before packing: the padding's dt must be 0, not softplus(bias)
            dt = dt.float() if dt_bias is None else dt.float() + dt_bias.float()
            if dt_softplus:
                dt = torch.nn.functional.softplus(dt)
            if (lo, hi) != _NO_LIMIT:
                dt = dt.clamp(lo, hi)
            y_packed, final, _, _ = ssd_fwd(
                layout.pack(x), layout.pack(dt), None, A, layout.pack(B), layout.pack(C), D,
                initial_states, int(chunk_size), int(transpoint), False, False, 0.0, math.inf,
                *layout.arrays(), len(docs))
            y = layout.unpack(y_packed, x)
    if z is not None:
        y = (y.float() * torch.nn.functional.silu(z.float())).to(x.dtype)
    return (y, final) if return_final_states else y
