"""Triton chunked SSD scan (Mamba-2) with a TransPoint: forward and backward.

Same function as ``naive.chunk_ssd_naive`` (Dao & Gu 2024, section 6; DESIGN section 5), split
into three forward kernels and three backward kernels over chunks of L tokens, with
Lam_t = sum of A*dt_r from the chunk start to t (inclusive):

  chunk state    U_c   = sum_s exp(Lam_end - Lam_s) dt_s x_s (x) B_s            [P, N] per chunk
  state passing  S_c   = exp(Lam_end,c-1) S_c-1 + U_c-1  (S_0 = initial state)   sequential in c
  chunk scan     y_t   = sum_{s<=t} exp(Lam_t - Lam_s) (C_t . B_s) dt_s x_s
                         + exp(Lam_t) S_c C_t + D x_t                             t >= transpoint

TransMamba (arXiv 2503.24067): tokens before the TransPoint p belong to attention, so their
outputs are never computed (chunks that end before p skip the scan: their programs only zero
the rows), while their states are, which is the Memory Converter fused into the scan (the SSM
state at p is exactly the converter's). The backward passes the state gradient in reverse
(dS_c = exp(Lam_end,c) dS_c+1 + sum_t exp(Lam_t) dy_t (x) C_t) and then computes dx, ddt, dB,
dC and the log-decay gradient per chunk; per-head dB/dC are summed over each group's heads.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch
import triton
from torch.utils.weak import WeakIdKeyDictionary
import triton.language as tl

from .naive import _check_initial_states, _check_inputs, _documents

__all__ = ["chunk_ssd_triton"]


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _tuned(blocks: dict, warps=(4, 8), stages=(1, 2, 3), **autotune_kwargs):
    """``triton.autotune`` over block sizes x warps x stages on GPUs. ``blocks`` maps each tuned
    block-size argument to its candidates; blocks larger than the padded head/state dimension
    are pruned. The key is (P, N, L, BH): BH, the power of two at or above batch * heads, says
    how many programs a grid has, which decides whether small or large blocks win. The
    interpreter runs one config (NOTES), with the block sizes the launcher passes explicitly
    (``_interpreter_blocks``). The choice is cached on disk with Triton's kernel cache
    (``cache_results``): the first process on a machine times the configs, later ones (a
    resumed run, ranks started later) read its choice, so they run the same kernels and skip
    the timing."""
    if _INTERPRET:
        return triton.autotune(configs=[triton.Config({}, num_warps=4)], key=[])
    names = list(blocks)
    combos = [dict(zip(names, values)) for values in itertools.product(*blocks.values())]
    configs = [triton.Config(combo, num_warps=w, num_stages=st)
               for combo in combos for w in warps for st in stages]

    def prune(configs, named_args, **kwargs):
        limit = {"BLOCK_P": named_args["P"], "BLOCK_N": named_args["N"]}
        fits = [c for c in configs
                if all(c.kwargs[k] <= max(16, triton.next_power_of_2(limit[k])) for k in names)]
        if fits:
            return fits
        smallest = min(c.kwargs[names[0]] for c in configs)
        return [c for c in configs if c.kwargs[names[0]] == smallest]

    return triton.autotune(configs=configs, key=["P", "N", "L", "BH"],
                           prune_configs_by={"early_config_prune": prune}, cache_results=True,
                           **autotune_kwargs)


def _interpreter_blocks(kernel: str, P: int, N: int) -> dict:
    """The block sizes the interpreter runs (on GPUs the autotuner picks them): the head and
    state dimensions rounded up to a power of two, at most 64 (the state kernels) or 64 for
    P and whole N (the chunk kernels). Tests monkeypatch this to cover other tilings."""
    bp = min(64, max(16, triton.next_power_of_2(P)))
    if kernel == "states":
        return {"BLOCK_P": bp, "BLOCK_N": min(64, max(16, triton.next_power_of_2(N)))}
    return {"BLOCK_P": bp}


def _launch_blocks(kernel: str, P: int, N: int) -> dict:
    """Block-size arguments a launcher passes: none on GPUs (tuned), explicit in the interpreter."""
    return _interpreter_blocks(kernel, P, N) if _INTERPRET else {}


# Candidates: state kernels tile [P, N] states over programs; the chunk kernels tile P.
_STATE_BLOCKS = {"BLOCK_P": (32, 64), "BLOCK_N": (32, 64)}
_MIN_STATE_BLOCK = 16   # dlam_end holds one partial per state block of at least this size


@_tuned(_STATE_BLOCKS, stages=(2, 3))
@triton.jit
def _states_fwd_kernel(
    x_ptr, b_ptr, dt_ptr, lam_ptr, init_ptr, states_ptr, final_ptr, chunk_doc_ptr, chunk_flag_ptr,
    T, T_pad, BH, H, G, P, N, num_chunks, sxb, sxt, sbb, sbt,
    L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_INIT: tl.constexpr,
    PACKED: tl.constexpr, IEEE: tl.constexpr,
):
    """States entering each chunk, for one (batch*head, P block, N block), chunk after chunk:
    S_c+1 = exp(Lam_end,c) S_c + sum_s exp(Lam_end,c - Lam_s) dt_s x_s (x) B_s."""
    bh, pid_p, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    g = h // (H // G)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_pn = (p[:, None] < P) & (n[None, :] < N)
    pn = p[:, None] * N + n[None, :]
    if HAS_INIT:
        s = tl.load(init_ptr + bh * P * N + pn, mask=mask_pn, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for c in range(num_chunks):
        if PACKED:  # one document per chunk run: it starts from its own initial state
            doc = tl.load(chunk_doc_ptr + c)
            flags = tl.load(chunk_flag_ptr + c)
            first, last = (flags & 1) != 0, (flags & 2) != 0
            if HAS_INIT:
                s0 = tl.load(init_ptr + (doc * H + h) * P * N + pn, mask=mask_pn & first, other=0.0)
            else:
                s0 = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
            s = tl.where(first, s0.to(tl.float32), s)
        tl.store(states_ptr + ((b * num_chunks + c) * H + h) * P * N + pn, s, mask=mask_pn)
        t = c * L + tl.arange(0, L)
        in_t = t < T
        x = tl.load(x_ptr + b * sxb + t[:, None] * sxt + h * P + p[None, :],
                    mask=in_t[:, None] & (p[None, :] < P), other=0.0)              # [L, BP]
        bm = tl.load(b_ptr + b * sbb + t[:, None] * sbt + g * N + n[None, :],
                     mask=in_t[:, None] & (n[None, :] < N), other=0.0)             # [L, BN]
        dt = tl.load(dt_ptr + (b * T_pad + t) * H + h)                             # [L] (padded)
        lam = tl.load(lam_ptr + (b * T_pad + t) * H + h)
        lam_end = tl.load(lam_ptr + (b * T_pad + c * L + L - 1) * H + h)
        xw = (x.to(tl.float32) * (tl.exp(lam_end - lam) * dt)[:, None]).to(bm.dtype)
        s = tl.exp(lam_end) * s + tl.dot(tl.trans(xw), bm, input_precision="ieee" if IEEE else "tf32")
        if PACKED:
            tl.store(final_ptr + (doc * H + h) * P * N + pn, s, mask=mask_pn & last)
    if not PACKED:
        tl.store(final_ptr + bh * P * N + pn, s, mask=mask_pn)


@_tuned({"BLOCK_P": (32, 64, 128)}, stages=(1,))
@triton.jit
def _chunk_scan_fwd_kernel(
    x_ptr, b_ptr, c_ptr, dt_ptr, lam_ptr, d_ptr, states_ptr, y_ptr, pos_ptr,
    T, T_pad, BH, H, G, P, N, num_chunks, transpoint, sxb, sxt, sbb, sbt, scb, sct,
    L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PACKED: tl.constexpr,
    IEEE: tl.constexpr,
):
    """y for one (chunk, batch*head, P block); rows before the TransPoint are zero."""
    c, bh, pid_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    g = h // (H // G)
    t = c * L + tl.arange(0, L)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    in_t = t < T
    mask_y = in_t[:, None] & (p[None, :] < P)
    y_ptrs = y_ptr + ((b * T + t[:, None]) * H + h) * P + p[None, :]
    if PACKED:  # the TransPoint counts from each document's start
        pos = tl.load(pos_ptr + t)
        last_pos = tl.load(pos_ptr + c * L + L - 1)
    else:
        pos = t
        last_pos = c * L + L - 1
    if last_pos < transpoint:  # attention-only chunk: nothing to compute
        tl.store(y_ptrs, tl.zeros([L, BLOCK_P], dtype=y_ptr.dtype.element_ty), mask=mask_y)
        return
    precision: tl.constexpr = "ieee" if IEEE else "tf32"
    x = tl.load(x_ptr + b * sxb + t[:, None] * sxt + h * P + p[None, :], mask=mask_y, other=0.0)
    mask_n = in_t[:, None] & (n[None, :] < N)
    bm = tl.load(b_ptr + b * sbb + t[:, None] * sbt + g * N + n[None, :], mask=mask_n, other=0.0)
    cm = tl.load(c_ptr + b * scb + t[:, None] * sct + g * N + n[None, :], mask=mask_n, other=0.0)
    dt = tl.load(dt_ptr + (b * T_pad + t) * H + h)
    lam = tl.load(lam_ptr + (b * T_pad + t) * H + h)
    scores = tl.dot(cm, tl.trans(bm), input_precision=precision)                   # [L, L]
    causal = tl.arange(0, L)[:, None] >= tl.arange(0, L)[None, :]
    decay = tl.exp(tl.where(causal, lam[:, None] - lam[None, :], float("-inf")))
    w = (scores * decay * dt[None, :]).to(x.dtype)
    y = tl.dot(w, x, input_precision=precision)                                    # [L, BP]
    s = tl.load(states_ptr + (((b * num_chunks + c) * H + h) * P + p[:, None]) * N + n[None, :],
                mask=(p[:, None] < P) & (n[None, :] < N), other=0.0)               # [BP, BN] fp32
    y += tl.exp(lam)[:, None] * tl.dot(cm, tl.trans(s.to(cm.dtype)), input_precision=precision)
    d = tl.load(d_ptr + h * P + p, mask=p < P, other=0.0)
    y += d[None, :] * x.to(tl.float32)
    y = tl.where((pos >= transpoint)[:, None], y, 0.0)
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_y)


@_tuned(_STATE_BLOCKS, stages=(2, 3), reset_to_zero=["dlam_end_ptr"])
@triton.jit
def _states_bwd_kernel(
    dy_ptr, c_ptr, lam_ptr, states_ptr, final_ptr, dfinal_ptr, dstates_ptr, dinit_ptr, dlam_end_ptr,
    chunk_doc_ptr, chunk_flag_ptr, pos_ptr,
    T, T_pad, BH, H, G, P, N, num_chunks, transpoint, num_blocks, scb, sct,
    L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DFINAL: tl.constexpr,
    PACKED: tl.constexpr, IEEE: tl.constexpr,
):
    """Gradients of the states leaving each chunk, last chunk first, for one (batch*head,
    P block, N block): dS_c = exp(Lam_end,c) dS_c+1 + sum_{t in c, t >= p} exp(Lam_t) dy_t C_t;
    also d initial_states and the partial sums <dS_out,c, S_end,c> of the chunk-end decay."""
    bh, pid_p, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    g = h // (H // G)
    block = pid_p * tl.num_programs(2) + pid_n
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_pn = (p[:, None] < P) & (n[None, :] < N)
    pn = p[:, None] * N + n[None, :]
    if HAS_DFINAL and not PACKED:
        ds = tl.load(dfinal_ptr + bh * P * N + pn, mask=mask_pn, other=0.0).to(tl.float32)
    else:
        ds = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    if PACKED:
        s_end = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    else:
        s_end = tl.load(final_ptr + bh * P * N + pn, mask=mask_pn, other=0.0)
    s_end = s_end.to(tl.float32)
    for i in range(num_chunks):
        c = num_chunks - 1 - i
        base = ((b * num_chunks + c) * H + h) * P * N
        if PACKED:  # a document's last chunk leaves its final state, nothing else
            doc = tl.load(chunk_doc_ptr + c)
            flags = tl.load(chunk_flag_ptr + c)
            first, last = (flags & 1) != 0, (flags & 2) != 0
            doc_off = (doc * H + h) * P * N + pn
            if HAS_DFINAL:
                dfin = tl.load(dfinal_ptr + doc_off, mask=mask_pn & last, other=0.0).to(tl.float32)
            else:
                dfin = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
            ds = tl.where(last, dfin, ds)
            s_end = tl.where(last, tl.load(final_ptr + doc_off, mask=mask_pn & last, other=0.0), s_end)
        tl.store(dstates_ptr + base + pn, ds, mask=mask_pn)
        tl.store(dlam_end_ptr + ((b * num_chunks + c) * H + h) * num_blocks + block, tl.sum(ds * s_end))
        s_end = tl.load(states_ptr + base + pn, mask=mask_pn, other=0.0).to(tl.float32)
        t = c * L + tl.arange(0, L)
        if PACKED:
            rows = (t < T) & (tl.load(pos_ptr + t) >= transpoint)
        else:
            rows = (t < T) & (t >= transpoint)
        dy = tl.load(dy_ptr + ((b * T + t[:, None]) * H + h) * P + p[None, :],
                     mask=rows[:, None] & (p[None, :] < P), other=0.0)
        cm = tl.load(c_ptr + b * scb + t[:, None] * sct + g * N + n[None, :],
                     mask=rows[:, None] & (n[None, :] < N), other=0.0)
        lam = tl.load(lam_ptr + (b * T_pad + t) * H + h)
        lam_end = tl.load(lam_ptr + (b * T_pad + c * L + L - 1) * H + h)
        dyw = (dy.to(tl.float32) * tl.exp(lam)[:, None]).to(cm.dtype)
        ds = tl.exp(lam_end) * ds + tl.dot(tl.trans(dyw), cm, input_precision="ieee" if IEEE else "tf32")
        if PACKED:
            tl.store(dinit_ptr + doc_off, ds, mask=mask_pn & first)
    if not PACKED:
        tl.store(dinit_ptr + bh * P * N + pn, ds, mask=mask_pn)


@_tuned({"BLOCK_P": (32, 64)}, stages=(1, 2))
@triton.jit
def _chunk_bwd_kernel(
    x_ptr, b_ptr, c_ptr, dt_ptr, lam_ptr, d_ptr, states_ptr, dstates_ptr, dy_ptr,
    dx_ptr, db_ptr, dc_ptr, ddt_ptr, dlam_ptr, dd_ptr, pos_ptr,
    T, T_pad, BH, H, G, P, N, num_chunks, transpoint, sxb, sxt, sbb, sbt, scb, sct,
    L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PACKED: tl.constexpr,
    IEEE: tl.constexpr,
):
    """dx, per-head dB and dC, ddt (through dt*x), dLam (without the chunk-end term), dD."""
    c, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    g = h // (H // G)
    precision: tl.constexpr = "ieee" if IEEE else "tf32"
    t = c * L + tl.arange(0, L)
    n = tl.arange(0, BLOCK_N)
    in_t = t < T
    if PACKED:
        rows = in_t & (tl.load(pos_ptr + t) >= transpoint)
    else:
        rows = in_t & (t >= transpoint)
    mask_n = in_t[:, None] & (n[None, :] < N)
    bm = tl.load(b_ptr + b * sbb + t[:, None] * sbt + g * N + n[None, :], mask=mask_n, other=0.0)
    cm = tl.load(c_ptr + b * scb + t[:, None] * sct + g * N + n[None, :], mask=mask_n, other=0.0)
    dt = tl.load(dt_ptr + (b * T_pad + t) * H + h)
    lam = tl.load(lam_ptr + (b * T_pad + t) * H + h)
    lam_end = tl.load(lam_ptr + (b * T_pad + c * L + L - 1) * H + h)
    e_out = tl.exp(lam)
    e_src = tl.exp(lam_end - lam)
    causal = tl.arange(0, L)[:, None] >= tl.arange(0, L)[None, :]
    decay = tl.exp(tl.where(causal, lam[:, None] - lam[None, :], float("-inf")))      # [t, s]
    scores = tl.dot(cm, tl.trans(bm), input_precision=precision)                      # [t, s]
    state_base = ((b * num_chunks + c) * H + h) * P

    # Dot operands in the input dtype (bf16/fp16 tensor cores; fp32 inputs stay exact, IEEE).
    io = x_ptr.dtype.element_ty
    # Pass 1 over P: dy.v (for dC, dB), dy S_in (dC from the passed state), v dS_out (dB).
    dyv = tl.zeros([L, L], dtype=tl.float32)
    dc_acc = tl.zeros([L, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([L, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask_p = p < P
        x = tl.load(x_ptr + b * sxb + t[:, None] * sxt + h * P + p[None, :],
                    mask=in_t[:, None] & mask_p[None, :], other=0.0)
        dy = tl.load(dy_ptr + ((b * T + t[:, None]) * H + h) * P + p[None, :],
                     mask=rows[:, None] & mask_p[None, :], other=0.0).to(io)
        smask = mask_p[:, None] & (n[None, :] < N)
        s_in = tl.load(states_ptr + (state_base + p[:, None]) * N + n[None, :], mask=smask, other=0.0)
        ds_out = tl.load(dstates_ptr + (state_base + p[:, None]) * N + n[None, :], mask=smask, other=0.0)
        v = (x.to(tl.float32) * dt[:, None]).to(io)
        dyv += tl.dot(dy, tl.trans(v), input_precision=precision)
        dc_acc += tl.dot(dy, s_in.to(io), input_precision=precision)
        db_acc += tl.dot(v, ds_out.to(io), input_precision=precision)
        tl.store(dd_ptr + ((b * num_chunks + c) * H + h) * P + p,
                 tl.sum(dy.to(tl.float32) * x.to(tl.float32), axis=0), mask=mask_p)
    wd = decay * dyv                                                                   # [t, s]
    dc = e_out[:, None] * dc_acc + tl.dot(wd.to(io), bm, input_precision=precision)
    db = e_src[:, None] * db_acc + tl.dot(tl.trans(wd).to(io), cm, input_precision=precision)
    dc = tl.where(rows[:, None], dc, 0.0)
    dlam = tl.sum(cm.to(tl.float32) * dc, axis=1) - tl.sum(bm.to(tl.float32) * db, axis=1)
    dbc_off = ((b * T + t[:, None]) * H + h) * N + n[None, :]
    tl.store(db_ptr + dbc_off, db.to(db_ptr.dtype.element_ty), mask=mask_n)
    tl.store(dc_ptr + dbc_off, dc.to(dc_ptr.dtype.element_ty), mask=mask_n)
    tl.store(dlam_ptr + (b * T_pad + t) * H + h, dlam)

    # Pass 2 over P: dv = (decay*scores)^T dy + e_src B dS_out^T; dx = dv dt + D dy.
    ws = tl.trans(decay * scores).to(io)                                               # [s, t]
    ddt = tl.zeros([L], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask_p = p < P
        mask_x = in_t[:, None] & mask_p[None, :]
        x = tl.load(x_ptr + b * sxb + t[:, None] * sxt + h * P + p[None, :], mask=mask_x, other=0.0)
        dy = tl.load(dy_ptr + ((b * T + t[:, None]) * H + h) * P + p[None, :],
                     mask=rows[:, None] & mask_p[None, :], other=0.0).to(io)
        ds_out = tl.load(dstates_ptr + (state_base + p[:, None]) * N + n[None, :],
                         mask=mask_p[:, None] & (n[None, :] < N), other=0.0)
        dv = tl.dot(ws, dy, input_precision=precision)
        dv += e_src[:, None] * tl.dot(bm, tl.trans(ds_out.to(io)), input_precision=precision)
        d = tl.load(d_ptr + h * P + p, mask=mask_p, other=0.0)
        dx = dv * dt[:, None] + d[None, :] * dy.to(tl.float32)
        tl.store(dx_ptr + ((b * T + t[:, None]) * H + h) * P + p[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=mask_x)
        ddt += tl.sum(dv * x.to(tl.float32), axis=1)
    tl.store(ddt_ptr + (b * T_pad + t) * H + h, ddt)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` [B, T, heads, dim] as the kernels read it: any batch and token strides (e.g. x, B
    and C as views into the mixer's conv output), heads and dim packed. Copies otherwise."""
    if t.stride(3) == 1 and t.stride(2) == t.shape[3]:
        return t
    return t.contiguous()


def _row_strides(*tensors: torch.Tensor) -> list[int]:
    """The batch and token strides of each ``_rows`` tensor, in the kernels' argument order."""
    return [stride for t in tensors for stride in (t.stride(0), t.stride(1))]


def _bh_bucket(batch: int, heads: int) -> int:
    """The autotuning key's measure of grid size: batch * heads rounded up to a power of two."""
    return triton.next_power_of_2(batch * heads)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the per-chunk states and state gradients kept between the kernels: the input
    dtype for bf16/fp16, whose dots already read them cast to it (so the forward is bitwise
    unchanged, and only the chunk-end decay gradient reads them rounded), float32 for float32
    inputs. Recurrences always accumulate in float32 registers."""
    return torch.float32 if dtype == torch.float32 else dtype


def _chunk_lambda(dt: torch.Tensor, A: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """dt padded to whole chunks (pad dt = 0 keeps the state) and Lam = in-chunk cumsum of A*dt."""
    batch, T, H = dt.shape
    num_chunks = max(1, triton.cdiv(T, L))
    dt_pad = torch.zeros(batch, num_chunks * L, H, dtype=torch.float32, device=dt.device)
    dt_pad[:, :T] = dt
    lam = (dt_pad * A.float()).view(batch, num_chunks, L, H).cumsum(2).view(batch, num_chunks * L, H)
    return dt_pad, lam.contiguous(), num_chunks


def _ssd_fwd(x, dt, A, B, C, D, initial_states, chunk_size, transpoint, layout):
    batch, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    L = chunk_size
    dt_pad, lam, num_chunks = _chunk_lambda(dt, A, L)
    block_n = max(16, triton.next_power_of_2(N))
    ieee = x.dtype == torch.float32
    states = torch.empty(batch, num_chunks, H, P, N, dtype=_state_dtype(x.dtype), device=x.device)
    init = initial_states.float().contiguous() if initial_states is not None else None
    if layout is None:
        final = torch.empty(batch, H, P, N, dtype=torch.float32, device=x.device)
    else:  # an empty document's final state is its initial state: the kernel never visits it
        final = init.clone() if init is not None else torch.zeros(
            layout.num_docs, H, P, N, dtype=torch.float32, device=x.device)
    docs, flags, pos = layout.arrays() if layout is not None else (lam, lam, lam)
    BH = _bh_bucket(batch, H)
    state_grid = lambda meta: (batch * H, triton.cdiv(P, meta["BLOCK_P"]), triton.cdiv(N, meta["BLOCK_N"]))
    _states_fwd_kernel[state_grid](
        x, B, dt_pad, lam, init if init is not None else final, states, final, docs, flags,
        T, num_chunks * L, BH, H, G, P, N, num_chunks, *_row_strides(x, B),
        L=L, HAS_INIT=init is not None, PACKED=layout is not None, IEEE=ieee,
        **_launch_blocks("states", P, N))
    grid = lambda meta: (num_chunks, batch * H, triton.cdiv(P, meta["BLOCK_P"]))
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _chunk_scan_fwd_kernel[grid](x, B, C, dt_pad, lam, D, states, y, pos, T, num_chunks * L, BH, H,
                                 G, P, N, num_chunks, transpoint, *_row_strides(x, B, C), L=L,
                                 BLOCK_N=block_n, PACKED=layout is not None, IEEE=ieee,
                                 **_launch_blocks("chunk", P, N))
    return y, final, states, dt_pad, lam


def _ssd_bwd(dy, dfinal, x, dt, A, B, C, D, states, final, dt_pad, lam, chunk_size, transpoint,
             layout):
    batch, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    L = chunk_size
    num_chunks = states.shape[1]
    T_pad = num_chunks * L
    block_n = max(16, triton.next_power_of_2(N))
    ieee = x.dtype == torch.float32
    dy = dy.contiguous()
    dstates = torch.empty_like(states)
    BH = _bh_bucket(batch, H)
    state_grid = lambda meta: (batch * H, triton.cdiv(P, meta["BLOCK_P"]), triton.cdiv(N, meta["BLOCK_N"]))
    # One partial sum per state block of the tiling the autotuner picks; unused slots stay zero.
    num_blocks = triton.cdiv(P, _MIN_STATE_BLOCK) * triton.cdiv(N, _MIN_STATE_BLOCK)
    if layout is None:
        dinit = torch.empty(batch, H, P, N, dtype=torch.float32, device=x.device)
    else:  # an empty document passes its final-state gradient straight to its initial state
        dinit = dfinal.float().clone() if dfinal is not None else torch.zeros_like(final)
    docs, flags, pos = layout.arrays() if layout is not None else (lam, lam, lam)
    dlam_end = torch.zeros(batch, num_chunks, H, num_blocks, dtype=torch.float32, device=x.device)
    _states_bwd_kernel[state_grid](
        dy, C, lam, states, final, dfinal.contiguous() if dfinal is not None else final, dstates,
        dinit, dlam_end, docs, flags, pos, T, T_pad, BH, H, G, P, N, num_chunks, transpoint,
        num_blocks, *_row_strides(C), L=L, HAS_DFINAL=dfinal is not None,
        PACKED=layout is not None, IEEE=ieee, **_launch_blocks("states", P, N))
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    # One group per head: the per-head gradients are the answer, written in B's dtype.
    per_head_dtype = B.dtype if G == H else torch.float32
    db = torch.empty(batch, T, H, N, dtype=per_head_dtype, device=x.device)
    dc = torch.empty(batch, T, H, N, dtype=per_head_dtype, device=x.device)
    ddt = torch.empty(batch, T_pad, H, dtype=torch.float32, device=x.device)
    dlam = torch.empty(batch, T_pad, H, dtype=torch.float32, device=x.device)
    dd = torch.empty(batch, num_chunks, H, P, dtype=torch.float32, device=x.device)
    _chunk_bwd_kernel[(num_chunks, batch * H)](
        x, B, C, dt_pad, lam, D, states, dstates, dy, dx, db, dc, ddt, dlam, dd, pos,
        T, T_pad, BH, H, G, P, N, num_chunks, transpoint, *_row_strides(x, B, C), L=L,
        BLOCK_N=block_n, PACKED=layout is not None, IEEE=ieee, **_launch_blocks("chunk", P, N))
    # The chunk-end log decay also scales the state leaving the chunk.
    dlam = dlam.view(batch, num_chunks, L, H)
    dlam[:, :, L - 1] += dlam_end.sum(-1)
    da = dlam.flip(2).cumsum(2).flip(2).reshape(batch, T_pad, H)[:, :T]              # d(A dt_r)
    ddt = ddt[:, :T] + da * A.float()
    dA = (da * dt_pad[:, :T]).sum((0, 1))
    dB = db if G == H else db.view(batch, T, G, H // G, N).sum(3)
    dC = dc if G == H else dc.view(batch, T, G, H // G, N).sum(3)
    return dx, ddt, dA, dB, dC, dinit, dd.sum((0, 1))


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


class _ChunkSSD(torch.autograd.Function):
    """x [B,T,H,P], dt [B,T,H] (processed, fp32), A [H], B/C [B,T,G,N], D [H,P] fp32."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_states, chunk_size, transpoint, layout):
        y, final, states, dt_pad, lam = _ssd_fwd(x, dt, A, B, C, D, initial_states, chunk_size,
                                                 transpoint, layout)
        ctx.save_for_backward(x, dt, A, B, C, D, states, final, dt_pad, lam)
        ctx.chunk_size, ctx.transpoint, ctx.layout = chunk_size, transpoint, layout
        ctx.has_init = initial_states is not None
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, states, final, dt_pad, lam = ctx.saved_tensors
        dx, ddt, dA, dB, dC, dinit, dD = _ssd_bwd(dy, dfinal, x, dt, A, B, C, D, states, final,
                                                  dt_pad, lam, ctx.chunk_size, ctx.transpoint,
                                                  ctx.layout)
        return (dx, ddt.to(dt.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
                dD.to(D.dtype), dinit if ctx.has_init else None, None, None, None)


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
    dt = dt.float() if dt_bias is None else dt.float() + dt_bias.float()
    if dt_softplus:
        dt = torch.nn.functional.softplus(dt)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(*dt_limit)
    H, P = dims.heads, dims.head_dim
    if D is None:
        D = torch.zeros(H, P, dtype=torch.float32, device=x.device)
    D = (D.float()[:, None].expand(H, P) if D.dim() == 1 else D.float()).contiguous()
    if not packed:
        y, final = _ChunkSSD.apply(_rows(x), dt.contiguous(), A.float(), _rows(B), _rows(C),
                                   D, initial_states, int(chunk_size),
                                   int(transpoint), None)
    else:
        if layout.padded_len == 0:  # only empty documents
            y = torch.zeros_like(x)
            final = (initial_states.float().clone() if initial_states is not None else
                     torch.zeros(len(docs), H, P, dims.state_dim, device=x.device))
        else:
            y_packed, final = _ChunkSSD.apply(
                layout.pack(x), layout.pack(dt), A.float(), layout.pack(B), layout.pack(C), D,
                initial_states, int(chunk_size), int(transpoint), layout)
            y = layout.unpack(y_packed, x)
    if z is not None:
        y = (y.float() * torch.nn.functional.silu(z.float())).to(x.dtype)
    return (y, final) if return_final_states else y
