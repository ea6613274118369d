"""Triton kernels of the chunked SSD scan (Mamba-2, Dao & Gu 2024 section 6), launched by
``chunk.py``; see its docstring for the equations and ``naive.chunk_ssd_naive`` for the spec.

Every kernel that needs the per-token decay recomputes it from the raw dt of its chunk
(``_chunk_dt``: + dt_bias, softplus, dt_limit clamp, Lam = in-chunk cumsum of A*dt), so no
processed dt or Lam is stored. Chunks are L tokens; the last is cut by masks (no padded copies).
"""

from __future__ import annotations

import itertools
import os

import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _tuned(blocks: dict, warps=(4, 8), stages=(1, 2, 3), **autotune_kwargs):
    """``triton.autotune`` over block sizes x warps x stages on GPUs. ``blocks`` maps each tuned
    block-size argument to its candidates; blocks larger than the padded head/state dimension
    are pruned. The key is (P, N, L, ROWS): ROWS, the power of two at or above batch * heads *
    chunks, says how many programs a grid has, which decides whether small or large blocks win
    (batch * heads alone gave T = 8192 and T = 65,536 at batch 1 the same key, so a benchmark
    at one length chose, through the disk cache, the blocks of the other). The
    interpreter runs one config (NOTES), with the block sizes the launcher passes explicitly
    (``chunk._interpreter_blocks``). The choice is cached on disk with Triton's kernel cache
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

    return triton.autotune(configs=configs, key=["P", "N", "L", "ROWS"],
                           prune_configs_by={"early_config_prune": prune}, cache_results=True,
                           **autotune_kwargs)


# Candidates: the chunk-state kernels tile [P, N] states; the chunk kernels tile P.
_STATE_BLOCKS = {"BLOCK_P": (32, 64), "BLOCK_N": (32, 64)}


@triton.jit
def _softplus(z):
    """torch's softplus (threshold 20); log1p(e) as log(u) * e / (u - 1), u = 1 + e, which is
    exact to rounding where log(1 + e) alone loses e's low bits."""
    e = tl.exp(z)
    u = 1.0 + e
    lp = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    return tl.where(z > 20.0, z, lp)


@triton.jit
def _chunk_dt(dt_ptr, bias_ptr, a_ptr, b, h, t, T, sdb, sdt, lo, hi,
              HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
              A_LOG: tl.constexpr):
    """(dt, Lam, z, A) of one chunk's tokens t [L] for head h: z = raw dt + dt_bias,
    dt = clamp(softplus(z)) (0 past T), Lam = cumsum(A dt), A = -exp(A_log) or A, in fp32."""
    in_t = t < T
    z = tl.load(dt_ptr + b * sdb + t * sdt + h, mask=in_t, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + h).to(tl.float32)
    dt = z
    if SOFTPLUS:
        dt = _softplus(z)
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, lo), hi)
    dt = tl.where(in_t, dt, 0.0)
    a = tl.load(a_ptr + h).to(tl.float32)
    if A_LOG:
        a = -tl.exp(a)
    lam = tl.cumsum(a * dt, axis=0)
    return dt, lam, z, a


@triton.jit
def _last(v, L: tl.constexpr):
    """v[L - 1] of an [L] vector (adding zeros: bitwise the element)."""
    return tl.sum(tl.where(tl.arange(0, L) == L - 1, v, 0.0), axis=0)


@_tuned(_STATE_BLOCKS, stages=(1,))
@triton.jit
def _chunk_state_fwd_kernel(
    x_ptr, b_ptr, dt_ptr, bias_ptr, a_ptr, u_ptr, decay_ptr,
    T, ROWS, H, G, P, N, num_chunks, sxb, sxt, sbb, sbt, sdb, sdt, lo, hi,
    L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, A_LOG: tl.constexpr, IEEE: tl.constexpr,
):
    """U_c = sum_s exp(Lam_end - Lam_s) dt_s x_s (x) B_s from a zero state, one program per
    (chunk, batch*head, [P, N] block); the first block also stores the chunk's Lam_end."""
    # The [P, N] blocks of one chunk are adjacent in launch order: they share x/dy and B/C
    # through L2 instead of rereading them from memory.
    nblk = tl.cdiv(P, BLOCK_P) * tl.cdiv(N, BLOCK_N)
    c, pid, bh = tl.program_id(0) // nblk, tl.program_id(0) % nblk, tl.program_id(1)
    b, h = bh // H, bh % H
    g = h // (H // G)
    blocks_n = tl.cdiv(N, BLOCK_N)
    p = (pid // blocks_n) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = (pid % blocks_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = c * L + tl.arange(0, L)
    in_t = t < T
    dt, lam, _z, _a = _chunk_dt(dt_ptr, bias_ptr, a_ptr, b, h, t, T, sdb, sdt, lo, hi,
                                HAS_BIAS, SOFTPLUS, HAS_LIMIT, A_LOG)
    lam_end = _last(lam, L)
    x = tl.load(x_ptr + b * sxb + t[:, None] * sxt + h * P + p[None, :],
                mask=in_t[:, None] & (p[None, :] < P), other=0.0)                  # [L, BP]
    bm = tl.load(b_ptr + b * sbb + t[:, None] * sbt + g * N + n[None, :],
                 mask=in_t[:, None] & (n[None, :] < N), other=0.0)                 # [L, BN]
    xw = (x.to(tl.float32) * (tl.exp(lam_end - lam) * dt)[:, None]).to(bm.dtype)
    u = tl.dot(tl.trans(xw), bm, input_precision="ieee" if IEEE else "tf32")      # [BP, BN]
    base = ((b * num_chunks + c) * H + h) * P * N
    tl.store(u_ptr + base + p[:, None] * N + n[None, :], u.to(u_ptr.dtype.element_ty),
             mask=(p[:, None] < P) & (n[None, :] < N))
    tl.store(decay_ptr + (b * num_chunks + c) * H + h, lam_end, mask=pid == 0)


@triton.jit
def _state_passing_fwd_kernel(
    states_ptr, decay_ptr, init_ptr, final_ptr, chunk_doc_ptr, chunk_flag_ptr,
    H, PN, num_chunks,
    BLOCK: tl.constexpr, HAS_INIT: tl.constexpr, PACKED: tl.constexpr,
):
    """S_c+1 = exp(Lam_end,c) S_c + U_c over the chunks of one batch*head, for BLOCK elements
    of the flattened [P, N] state. Overwrites U_c with S_c (the state entering chunk c) in place;
    the next chunk's U is loaded before the current one is stored."""
    bh, pid = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    e = pid * BLOCK + tl.arange(0, BLOCK)
    m = e < PN
    if HAS_INIT and not PACKED:
        s = tl.load(init_ptr + bh * PN + e, mask=m, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BLOCK], dtype=tl.float32)
    u_next = tl.load(states_ptr + (b * num_chunks * H + h) * PN + e, mask=m, other=0.0)
    for c in range(num_chunks):
        u = u_next.to(tl.float32)
        row = (b * num_chunks + c) * H + h
        u_next = tl.load(states_ptr + (row + H) * PN + e, mask=m & (c + 1 < num_chunks), other=0.0)
        decay = tl.load(decay_ptr + row)
        if PACKED:  # a document's first chunk starts from its own initial state
            doc = tl.load(chunk_doc_ptr + c)
            flags = tl.load(chunk_flag_ptr + c)
            if HAS_INIT:
                s0 = tl.load(init_ptr + (doc * H + h) * PN + e, mask=m & ((flags & 1) != 0), other=0.0)
                s = tl.where((flags & 1) != 0, s0.to(tl.float32), s)
            else:
                s = tl.where((flags & 1) != 0, 0.0, s)
        tl.store(states_ptr + row * PN + e, s.to(states_ptr.dtype.element_ty), mask=m)
        s = tl.exp(decay) * s + u
        if PACKED:
            tl.store(final_ptr + (doc * H + h) * PN + e, s, mask=m & ((flags & 2) != 0))
    if not PACKED:
        tl.store(final_ptr + bh * PN + e, s, mask=m)


@triton.jit
def _affine(a1, b1, a2, b2):
    """s -> a1 s + b1 followed by s -> a2 s + b2: the state recurrence's scan operator."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _state_passing_fwd_tiled_kernel(
    states_ptr, decay_ptr, init_ptr, final_ptr, H, PN, num_chunks,
    BLOCK: tl.constexpr, CHUNKS: tl.constexpr, HAS_INIT: tl.constexpr,
):
    """``_state_passing_fwd_kernel`` (without documents) CHUNKS chunks a step: the step loads
    CHUNKS chunks' U and decays at once and composes them with an associative scan of
    (exp(Lam_end), U), so NC / CHUNKS dependent steps (8 at 128 chunks) each wait on one load
    instead of NC steps on one load each. U_c is overwritten in place by S_c, whose row is
    the next step's first U row: that step's load is issued, and a barrier passed, before
    the store."""
    bh, pid = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    e = pid * BLOCK + tl.arange(0, BLOCK)
    m = e < PN
    k = tl.arange(0, CHUNKS)
    first = b * num_chunks * H + h                         # row of chunk c: first + c * H
    if HAS_INIT:
        s = tl.load(init_ptr + bh * PN + e, mask=m, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BLOCK], dtype=tl.float32)
    # Chunks past the last are the identity (decay 0, U 0), so the carry passes them unchanged.
    u_next = tl.load(states_ptr + (first + k * H)[:, None] * PN + e[None, :],
                     mask=(k < num_chunks)[:, None] & m[None, :], other=0.0)
    d_next = tl.load(decay_ptr + first + k * H, mask=k < num_chunks, other=0.0)
    tl.debug_barrier()
    tl.store(states_ptr + first * PN + e, s.to(states_ptr.dtype.element_ty), mask=m)
    for c0 in range(0, num_chunks, CHUNKS):
        u, d = u_next.to(tl.float32), d_next
        c = c0 + CHUNKS + k
        u_next = tl.load(states_ptr + (first + c * H)[:, None] * PN + e[None, :],
                         mask=(c < num_chunks)[:, None] & m[None, :], other=0.0)
        d_next = tl.load(decay_ptr + first + c * H, mask=c < num_chunks, other=0.0)
        tl.debug_barrier()
        a = tl.broadcast_to(tl.exp(d)[:, None], (CHUNKS, BLOCK))
        a_run, u_run = tl.associative_scan((a, u), 0, _affine)
        s_out = a_run * s[None, :] + u_run                 # [CHUNKS, BLOCK] leaving chunk c0 + k
        nxt = c0 + k + 1
        tl.store(states_ptr + (first + nxt * H)[:, None] * PN + e[None, :],
                 s_out.to(states_ptr.dtype.element_ty), mask=(nxt < num_chunks)[:, None] & m[None, :])
        s = tl.sum(tl.where(k[:, None] == CHUNKS - 1, s_out, 0.0), axis=0)
    tl.store(final_ptr + bh * PN + e, s, mask=m)


@_tuned({"BLOCK_P": (32, 64, 128)}, stages=(1,))
@triton.jit
def _chunk_scan_fwd_kernel(
    x_ptr, b_ptr, c_ptr, dt_ptr, bias_ptr, a_ptr, d_ptr, states_ptr, y_ptr, pos_ptr,
    T, ROWS, H, G, P, N, num_chunks, transpoint, sxb, sxt, sbb, sbt, scb, sct, sdb, sdt, lo, hi,
    L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, A_LOG: tl.constexpr, HAS_D: tl.constexpr,
    D_PER_P: tl.constexpr, PACKED: tl.constexpr, IEEE: tl.constexpr,
):
    """y = (C B^T o decay o dt) x + exp(Lam) C S^T + D x for one (chunk, batch*head, P block);
    rows before the TransPoint are zero."""
    nblk = tl.cdiv(P, BLOCK_P)                             # P blocks of a chunk adjacent
    c, pid_p, bh = tl.program_id(0) // nblk, tl.program_id(0) % nblk, tl.program_id(1)
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
    dt, lam, _z, _a = _chunk_dt(dt_ptr, bias_ptr, a_ptr, b, h, t, T, sdb, sdt, lo, hi,
                                HAS_BIAS, SOFTPLUS, HAS_LIMIT, A_LOG)
    x = tl.load(x_ptr + b * sxb + t[:, None] * sxt + h * P + p[None, :], mask=mask_y, other=0.0)
    mask_n = in_t[:, None] & (n[None, :] < N)
    bm = tl.load(b_ptr + b * sbb + t[:, None] * sbt + g * N + n[None, :], mask=mask_n, other=0.0)
    cm = tl.load(c_ptr + b * scb + t[:, None] * sct + g * N + n[None, :], mask=mask_n, other=0.0)
    scores = tl.dot(cm, tl.trans(bm), input_precision=precision)                   # [L, L]
    causal = tl.arange(0, L)[:, None] >= tl.arange(0, L)[None, :]
    decay = tl.exp(tl.where(causal, lam[:, None] - lam[None, :], float("-inf")))
    w = (scores * decay * dt[None, :]).to(x.dtype)
    y = tl.dot(w, x, input_precision=precision)                                    # [L, BP]
    s = tl.load(states_ptr + (((b * num_chunks + c) * H + h) * P + p[:, None]) * N + n[None, :],
                mask=(p[:, None] < P) & (n[None, :] < N), other=0.0)               # [BP, BN]
    y += tl.exp(lam)[:, None] * tl.dot(cm, tl.trans(s.to(cm.dtype)), input_precision=precision)
    if HAS_D:
        if D_PER_P:
            d = tl.load(d_ptr + h * P + p, mask=p < P, other=0.0).to(tl.float32)
            y += d[None, :] * x.to(tl.float32)
        else:
            y += tl.load(d_ptr + h).to(tl.float32) * x.to(tl.float32)
    y = tl.where((pos >= transpoint)[:, None], y, 0.0)
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_y)


@_tuned(_STATE_BLOCKS, stages=(1,))
@triton.jit
def _chunk_state_bwd_kernel(
    dy_ptr, c_ptr, dt_ptr, bias_ptr, a_ptr, v_ptr, pos_ptr,
    T, ROWS, H, G, P, N, num_chunks, transpoint, sdyb, sdyt, scb, sct, sdb, sdt, lo, hi,
    L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, A_LOG: tl.constexpr, PACKED: tl.constexpr,
    IEEE: tl.constexpr,
):
    """V_c = sum_{t in c, t >= p} exp(Lam_t) dy_t (x) C_t, the state gradient chunk c's own
    outputs give the state entering it; one program per (chunk, batch*head, [P, N] block)."""
    # The [P, N] blocks of one chunk are adjacent in launch order: they share x/dy and B/C
    # through L2 instead of rereading them from memory.
    nblk = tl.cdiv(P, BLOCK_P) * tl.cdiv(N, BLOCK_N)
    c, pid, bh = tl.program_id(0) // nblk, tl.program_id(0) % nblk, tl.program_id(1)
    b, h = bh // H, bh % H
    g = h // (H // G)
    blocks_n = tl.cdiv(N, BLOCK_N)
    p = (pid // blocks_n) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = (pid % blocks_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = c * L + tl.arange(0, L)
    if PACKED:
        rows = (t < T) & (tl.load(pos_ptr + t) >= transpoint)
    else:
        rows = (t < T) & (t >= transpoint)
    _dt, lam, _z, _a = _chunk_dt(dt_ptr, bias_ptr, a_ptr, b, h, t, T, sdb, sdt, lo, hi,
                                 HAS_BIAS, SOFTPLUS, HAS_LIMIT, A_LOG)
    dy = tl.load(dy_ptr + b * sdyb + t[:, None] * sdyt + h * P + p[None, :],
                 mask=rows[:, None] & (p[None, :] < P), other=0.0)
    cm = tl.load(c_ptr + b * scb + t[:, None] * sct + g * N + n[None, :],
                 mask=rows[:, None] & (n[None, :] < N), other=0.0)
    dyw = (dy.to(tl.float32) * tl.exp(lam)[:, None]).to(cm.dtype)
    v = tl.dot(tl.trans(dyw), cm, input_precision="ieee" if IEEE else "tf32")
    base = ((b * num_chunks + c) * H + h) * P * N
    tl.store(v_ptr + base + p[:, None] * N + n[None, :], v.to(v_ptr.dtype.element_ty),
             mask=(p[:, None] < P) & (n[None, :] < N))


@triton.jit
def _state_passing_bwd_kernel(
    dstates_ptr, states_ptr, final_ptr, decay_ptr, dfinal_ptr, dinit_ptr, dlam_end_ptr,
    chunk_doc_ptr, chunk_flag_ptr,
    H, PN, num_chunks, num_blocks,
    BLOCK: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_DINIT: tl.constexpr, PACKED: tl.constexpr,
):
    """Gradients of the states leaving each chunk, last chunk first, for BLOCK elements of one
    batch*head's flattened state: dS_c = exp(Lam_end,c) dS_c+1 + V_c. Overwrites V_c with the
    gradient of the state leaving chunk c, writes d initial_states and one partial
    <dS_out,c, S_out,c> per block (the chunk-end log-decay gradient, summed by the chunk
    backward in block order: deterministic)."""
    bh, pid = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    e = pid * BLOCK + tl.arange(0, BLOCK)
    m = e < PN
    if HAS_DFINAL and not PACKED:
        ds = tl.load(dfinal_ptr + bh * PN + e, mask=m, other=0.0).to(tl.float32)
    else:
        ds = tl.zeros([BLOCK], dtype=tl.float32)
    if PACKED:
        s_end = tl.zeros([BLOCK], dtype=tl.float32)
    else:
        s_end = tl.load(final_ptr + bh * PN + e, mask=m, other=0.0)
    last_row = (b * num_chunks + num_chunks - 1) * H + h
    v_next = tl.load(dstates_ptr + last_row * PN + e, mask=m, other=0.0)
    s_next = tl.load(states_ptr + last_row * PN + e, mask=m, other=0.0)
    for i in range(num_chunks):
        c = num_chunks - 1 - i
        row = (b * num_chunks + c) * H + h
        v, s_in = v_next.to(tl.float32), s_next.to(tl.float32)
        v_next = tl.load(dstates_ptr + (row - H) * PN + e, mask=m & (c > 0), other=0.0)
        s_next = tl.load(states_ptr + (row - H) * PN + e, mask=m & (c > 0), other=0.0)
        decay = tl.load(decay_ptr + row)
        if PACKED:  # a document's last chunk leaves its final state, nothing else
            doc = tl.load(chunk_doc_ptr + c)
            flags = tl.load(chunk_flag_ptr + c)
            last = (flags & 2) != 0
            if HAS_DFINAL:
                dfin = tl.load(dfinal_ptr + (doc * H + h) * PN + e, mask=m & last, other=0.0)
                ds = tl.where(last, dfin.to(tl.float32), ds)
            else:
                ds = tl.where(last, 0.0, ds)
            fin = tl.load(final_ptr + (doc * H + h) * PN + e, mask=m & last, other=0.0)
            s_end = tl.where(last, fin, s_end)
        tl.store(dstates_ptr + row * PN + e, ds.to(dstates_ptr.dtype.element_ty), mask=m)
        tl.store(dlam_end_ptr + row * num_blocks + pid, tl.sum(ds * s_end.to(tl.float32), axis=0))
        s_end = s_in
        ds = tl.exp(decay) * ds + v
        if PACKED and HAS_DINIT:
            tl.store(dinit_ptr + (doc * H + h) * PN + e, ds.to(dinit_ptr.dtype.element_ty),
                     mask=m & ((flags & 1) != 0))
    if HAS_DINIT and not PACKED:
        tl.store(dinit_ptr + bh * PN + e, ds.to(dinit_ptr.dtype.element_ty), mask=m)


@triton.jit
def _state_passing_bwd_tiled_kernel(
    dstates_ptr, states_ptr, final_ptr, decay_ptr, dfinal_ptr, dinit_ptr, dlam_end_ptr,
    H, PN, num_chunks, num_blocks,
    BLOCK: tl.constexpr, CHUNKS: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_DINIT: tl.constexpr,
):
    """``_state_passing_bwd_kernel`` (without documents) CHUNKS chunks a step, last chunk
    first: dS_c-1 = exp(Lam_end,c) dS_c + V_c composed by an associative scan over the step's
    chunks, and the step's chunk-end partials <dS_out, S_out> as one [CHUNKS] reduction. As in
    the forward, the next step's load is issued, and a barrier passed, before the in-place
    store that overlaps it."""
    bh, pid = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    e = pid * BLOCK + tl.arange(0, BLOCK)
    m = e < PN
    k = tl.arange(0, CHUNKS)
    first = b * num_chunks * H + h                         # row of chunk c: first + c * H
    last = num_chunks - 1
    if HAS_DFINAL:
        ds = tl.load(dfinal_ptr + bh * PN + e, mask=m, other=0.0).to(tl.float32)
    else:
        ds = tl.zeros([BLOCK], dtype=tl.float32)
    s_end = tl.load(final_ptr + bh * PN + e, mask=m, other=0.0)
    r = last - k                                           # step's chunks, last first
    v_next = tl.load(dstates_ptr + (first + r * H)[:, None] * PN + e[None, :],
                     mask=(r >= 0)[:, None] & m[None, :], other=0.0)
    s_next = tl.load(states_ptr + (first + r * H)[:, None] * PN + e[None, :],
                     mask=(r >= 0)[:, None] & m[None, :], other=0.0)
    d_next = tl.load(decay_ptr + first + r * H, mask=r >= 0, other=0.0)
    tl.debug_barrier()
    tl.store(dstates_ptr + (first + last * H) * PN + e, ds.to(dstates_ptr.dtype.element_ty), mask=m)
    tl.store(dlam_end_ptr + (first + last * H) * num_blocks + pid, tl.sum(ds * s_end, axis=0))
    for i in range(0, num_chunks, CHUNKS):
        v, s_in, d = v_next.to(tl.float32), s_next.to(tl.float32), d_next
        r = last - i - CHUNKS - k
        v_next = tl.load(dstates_ptr + (first + r * H)[:, None] * PN + e[None, :],
                         mask=(r >= 0)[:, None] & m[None, :], other=0.0)
        s_next = tl.load(states_ptr + (first + r * H)[:, None] * PN + e[None, :],
                         mask=(r >= 0)[:, None] & m[None, :], other=0.0)
        d_next = tl.load(decay_ptr + first + r * H, mask=r >= 0, other=0.0)
        tl.debug_barrier()
        a = tl.broadcast_to(tl.exp(d)[:, None], (CHUNKS, BLOCK))
        a_run, v_run = tl.associative_scan((a, v), 0, _affine)
        ds_out = a_run * ds[None, :] + v_run               # leaving chunk last - i - k - 1
        prev = last - i - k - 1
        tl.store(dstates_ptr + (first + prev * H)[:, None] * PN + e[None, :],
                 ds_out.to(dstates_ptr.dtype.element_ty), mask=(prev >= 0)[:, None] & m[None, :])
        # S leaving chunk prev is S entering chunk prev + 1: this step's states row.
        tl.store(dlam_end_ptr + (first + prev * H) * num_blocks + pid, tl.sum(ds_out * s_in, axis=1),
                 mask=prev >= 0)
        ds = tl.sum(tl.where(k[:, None] == CHUNKS - 1, ds_out, 0.0), axis=0)
    if HAS_DINIT:
        tl.store(dinit_ptr + bh * PN + e, ds.to(dinit_ptr.dtype.element_ty), mask=m)


@_tuned({"BLOCK_P": (16, 32)}, stages=(1,))
@triton.jit
def _chunk_bwd_kernel(
    x_ptr, b_ptr, c_ptr, dt_ptr, bias_ptr, a_ptr, d_ptr, states_ptr, dstates_ptr, dlam_end_ptr,
    dy_ptr, pdx_ptr, pdb_ptr, pdc_ptr,
    dx_ptr, db_ptr, dc_ptr, ddt_ptr, da_part_ptr, dbias_part_ptr, dd_part_ptr, pos_ptr,
    T, ROWS, H, G, P, N, num_chunks, transpoint, num_blocks,
    sxb, sxt, sbb, sbt, scb, sct, sdb, sdt, sdyb, sdyt,
    spxb, spxt, spbb, spbt, spcb, spct, lo, hi,
    L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    A_LOG: tl.constexpr, HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_PDX: tl.constexpr,
    HAS_PDB: tl.constexpr, HAS_PDC: tl.constexpr, PACKED: tl.constexpr, IEEE: tl.constexpr,
):
    """One (chunk, batch*head): dx, per-head dB and dC (rows before the TransPoint plus the
    given prefix gradients), the raw dt's gradient through the decay, softplus, clamp and bias,
    and this chunk's partial sums for dA, d dt_bias and dD."""
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
    prefix = in_t & (t < transpoint)       # rows whose outputs are attention's (not packed)
    mask_n = in_t[:, None] & (n[None, :] < N)
    bm = tl.load(b_ptr + b * sbb + t[:, None] * sbt + g * N + n[None, :], mask=mask_n, other=0.0)
    cm = tl.load(c_ptr + b * scb + t[:, None] * sct + g * N + n[None, :], mask=mask_n, other=0.0)
    dt, lam, z, a = _chunk_dt(dt_ptr, bias_ptr, a_ptr, b, h, t, T, sdb, sdt, lo, hi,
                              HAS_BIAS, SOFTPLUS, HAS_LIMIT, A_LOG)
    lam_end = _last(lam, L)
    e_out = tl.exp(lam)
    e_src = tl.exp(lam_end - lam)
    causal = tl.arange(0, L)[:, None] >= tl.arange(0, L)[None, :]
    decay = tl.exp(tl.where(causal, lam[:, None] - lam[None, :], float("-inf")))      # [t, s]
    scores = tl.dot(cm, tl.trans(bm), input_precision=precision)                      # [t, s]
    row = (b * num_chunks + c) * H + h
    state_base = row * P

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
        dy = tl.load(dy_ptr + b * sdyb + t[:, None] * sdyt + h * P + p[None, :],
                     mask=rows[:, None] & mask_p[None, :], other=0.0).to(io)
        smask = mask_p[:, None] & (n[None, :] < N)
        s_in = tl.load(states_ptr + (state_base + p[:, None]) * N + n[None, :], mask=smask, other=0.0)
        ds_out = tl.load(dstates_ptr + (state_base + p[:, None]) * N + n[None, :], mask=smask, other=0.0)
        v = (x.to(tl.float32) * dt[:, None]).to(io)
        dyv += tl.dot(dy, tl.trans(v), input_precision=precision)
        dc_acc += tl.dot(dy, s_in.to(io), input_precision=precision)
        db_acc += tl.dot(v, ds_out.to(io), input_precision=precision)
        if HAS_D:
            tl.store(dd_part_ptr + row * P + p, tl.sum(dy.to(tl.float32) * x.to(tl.float32), axis=0),
                     mask=mask_p)
    wd = decay * dyv                                                                   # [t, s]
    dc = e_out[:, None] * dc_acc + tl.dot(wd.to(io), bm, input_precision=precision)
    db = e_src[:, None] * db_acc + tl.dot(tl.trans(wd).to(io), cm, input_precision=precision)
    dc = tl.where(rows[:, None], dc, 0.0)
    dlam = tl.sum(cm.to(tl.float32) * dc, axis=1) - tl.sum(bm.to(tl.float32) * db, axis=1)
    # The prefix gradients enter once per group: through the group's first head.
    first_of_group = (h % (H // G)) == 0
    if HAS_PDB:
        db += tl.load(pdb_ptr + b * spbb + t[:, None] * spbt + g * N + n[None, :],
                      mask=(prefix[:, None] & (n[None, :] < N)) & first_of_group,
                      other=0.0).to(tl.float32)
    if HAS_PDC:
        dc += tl.load(pdc_ptr + b * spcb + t[:, None] * spct + g * N + n[None, :],
                      mask=(prefix[:, None] & (n[None, :] < N)) & first_of_group,
                      other=0.0).to(tl.float32)
    dbc_off = ((b * T + t[:, None]) * H + h) * N + n[None, :]
    tl.store(db_ptr + dbc_off, db.to(db_ptr.dtype.element_ty), mask=mask_n)
    tl.store(dc_ptr + dbc_off, dc.to(dc_ptr.dtype.element_ty), mask=mask_n)

    # Pass 2 over P: dv = (decay*scores)^T dy + e_src B dS_out^T; dx = dv dt + D dy.
    ws = tl.trans(decay * scores).to(io)                                               # [s, t]
    ddt = tl.zeros([L], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask_p = p < P
        mask_x = in_t[:, None] & mask_p[None, :]
        x = tl.load(x_ptr + b * sxb + t[:, None] * sxt + h * P + p[None, :], mask=mask_x, other=0.0)
        dy = tl.load(dy_ptr + b * sdyb + t[:, None] * sdyt + h * P + p[None, :],
                     mask=rows[:, None] & mask_p[None, :], other=0.0).to(io)
        ds_out = tl.load(dstates_ptr + (state_base + p[:, None]) * N + n[None, :],
                         mask=mask_p[:, None] & (n[None, :] < N), other=0.0)
        dv = tl.dot(ws, dy, input_precision=precision)
        dv += e_src[:, None] * tl.dot(bm, tl.trans(ds_out.to(io)), input_precision=precision)
        dx = dv * dt[:, None]
        if HAS_D:
            if D_PER_P:
                d = tl.load(d_ptr + h * P + p, mask=mask_p, other=0.0).to(tl.float32)
                dx += d[None, :] * dy.to(tl.float32)
            else:
                dx += tl.load(d_ptr + h).to(tl.float32) * dy.to(tl.float32)
        if HAS_PDX:
            dx += tl.load(pdx_ptr + b * spxb + t[:, None] * spxt + h * P + p[None, :],
                          mask=prefix[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
        tl.store(dx_ptr + ((b * T + t[:, None]) * H + h) * P + p[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=mask_x)
        ddt += tl.sum(dv * x.to(tl.float32), axis=1)

    # Lam_t = sum_{r <= t} A dt_r: the state leaving the chunk scales with exp(Lam_end), whose
    # gradient the state-passing kernel left as per-block partials; then d(A dt_r) is the
    # reverse cumsum of dLam, and the chain runs through the clamp, softplus and bias.
    e = tl.arange(0, BLOCK_E)
    dlam_end = tl.sum(tl.load(dlam_end_ptr + row * num_blocks + e, mask=e < num_blocks, other=0.0),
                      axis=0)
    dlam += tl.where(tl.arange(0, L) == L - 1, dlam_end, 0.0)
    da = tl.cumsum(dlam, axis=0, reverse=True)                                        # d(A dt_r)
    ddt += da * a
    tl.store(da_part_ptr + row, tl.sum(da * dt, axis=0))
    if HAS_LIMIT:
        pre = z
        if SOFTPLUS:
            pre = _softplus(z)
        ddt = tl.where((pre >= lo) & (pre <= hi), ddt, 0.0)
    if SOFTPLUS:
        ddt = tl.where(z > 20.0, ddt, ddt / (1.0 + tl.exp(-z)))
    ddt = tl.where(in_t, ddt, 0.0)
    tl.store(ddt_ptr + (b * T + t) * H + h, ddt.to(ddt_ptr.dtype.element_ty), mask=in_t)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + row, tl.sum(ddt, axis=0))


@_tuned({"BLOCK_P": (32, 64), "BLOCK_N": (32, 64, 128)}, stages=(1,))
@triton.jit
def _chunk_bwd_dbc_kernel(
    x_ptr, b_ptr, c_ptr, dt_ptr, bias_ptr, a_ptr, states_ptr, dstates_ptr, dy_ptr, pdb_ptr,
    pdc_ptr, db_ptr, dc_ptr, dlam_part_ptr, pos_ptr,
    T, ROWS, H, G, P, N, num_chunks, transpoint,
    sxb, sxt, sbb, sbt, scb, sct, sdb, sdt, sdyb, sdyt, spbb, spbt, spcb, spct, lo, hi,
    L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, A_LOG: tl.constexpr, PDB: tl.constexpr,
    PDC: tl.constexpr, PACKED: tl.constexpr, IEEE: tl.constexpr,
):
    """The split chunk backward's first half, one program per (chunk, batch*head, N block of
    dC or of dB): per-head dC = exp(Lam) dy S_in + (decay o dy v^T) B and dB = exp(Lam_end - Lam)
    v dS_out + (decay o dy v^T)^T C with v = x dt (rows before the TransPoint get no dC, and
    the given prefix gradients are added), and the block's share of dLam, C.dC or -B.dB,
    kept per program (summed in a fixed order by ``_chunk_bwd_dx_kernel``). Each program
    holds one [L, BLOCK_N] accumulator and [L, L] of dy v^T, which it recomputes (2 NB times
    the fused kernel's [L, L] x P FLOPs, a few percent of the total)."""
    nblk = 2 * tl.cdiv(N, BLOCK_N)                         # a chunk's programs adjacent
    c, pid, bh = tl.program_id(0) // nblk, tl.program_id(0) % nblk, tl.program_id(1)
    b, h = bh // H, bh % H
    g = h // (H // G)
    blocks_n = tl.cdiv(N, BLOCK_N)
    is_db = pid >= blocks_n
    n = (pid % blocks_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    precision: tl.constexpr = "ieee" if IEEE else "tf32"
    t = c * L + tl.arange(0, L)
    in_t = t < T
    if PACKED:
        rows = in_t & (tl.load(pos_ptr + t) >= transpoint)
    else:
        rows = in_t & (t >= transpoint)
    dt, lam, _z, _a = _chunk_dt(dt_ptr, bias_ptr, a_ptr, b, h, t, T, sdb, sdt, lo, hi,
                                HAS_BIAS, SOFTPLUS, HAS_LIMIT, A_LOG)
    lam_end = _last(lam, L)
    row = (b * num_chunks + c) * H + h
    io = x_ptr.dtype.element_ty
    st_ptr = tl.where(is_db, dstates_ptr, states_ptr)      # dB reads dS_out, dC reads S_in
    dyv = tl.zeros([L, L], dtype=tl.float32)
    acc = tl.zeros([L, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask_p = p < P
        x = tl.load(x_ptr + b * sxb + t[:, None] * sxt + h * P + p[None, :],
                    mask=in_t[:, None] & mask_p[None, :], other=0.0)
        dy = tl.load(dy_ptr + b * sdyb + t[:, None] * sdyt + h * P + p[None, :],
                     mask=rows[:, None] & mask_p[None, :], other=0.0).to(io)
        st = tl.load(st_ptr + (row * P + p[:, None]) * N + n[None, :],
                     mask=mask_p[:, None] & (n[None, :] < N), other=0.0)
        v = (x.to(tl.float32) * dt[:, None]).to(io)
        dyv += tl.dot(dy, tl.trans(v), input_precision=precision)
        acc += tl.dot(tl.where(is_db, v, dy), st.to(io), input_precision=precision)
    causal = tl.arange(0, L)[:, None] >= tl.arange(0, L)[None, :]
    wd = tl.exp(tl.where(causal, lam[:, None] - lam[None, :], float("-inf"))) * dyv   # [t, s]
    mask_n = in_t[:, None] & (n[None, :] < N)
    bm = tl.load(b_ptr + b * sbb + t[:, None] * sbt + g * N + n[None, :], mask=mask_n, other=0.0)
    cm = tl.load(c_ptr + b * scb + t[:, None] * sct + g * N + n[None, :], mask=mask_n, other=0.0)
    scale = tl.where(is_db, tl.exp(lam_end - lam), tl.exp(lam))
    grad = scale[:, None] * acc + tl.dot(tl.where(is_db, tl.trans(wd), wd).to(io),
                                         tl.where(is_db, cm, bm), input_precision=precision)
    grad = tl.where(rows[:, None] | is_db, grad, 0.0)
    dlam = tl.sum(tl.where(is_db, bm, cm).to(tl.float32) * grad, axis=1)
    tl.store(dlam_part_ptr + (row * 2 * blocks_n + pid) * L + tl.arange(0, L),
             tl.where(is_db, -dlam, dlam))
    if PDB + PDC > 0:  # prefix gradients enter once per group: through its first head
        pd_ptr = tl.where(is_db, pdb_ptr, pdc_ptr)
        sdb_, sdt_ = tl.where(is_db, spbb, spcb), tl.where(is_db, spbt, spct)
        take = (tl.where(is_db, PDB, PDC) != 0) & ((h % (H // G)) == 0)
        prefix = in_t & (t < transpoint)
        grad += tl.load(pd_ptr + b * sdb_ + t[:, None] * sdt_ + g * N + n[None, :],
                        mask=(prefix[:, None] & (n[None, :] < N)) & take, other=0.0).to(tl.float32)
    out_ptr = tl.where(is_db, db_ptr, dc_ptr)
    tl.store(out_ptr + ((b * T + t[:, None]) * H + h) * N + n[None, :],
             grad.to(db_ptr.dtype.element_ty), mask=mask_n)


@_tuned({"BLOCK_P": (32, 64)}, stages=(1, 2))
@triton.jit
def _chunk_bwd_dx_kernel(
    x_ptr, b_ptr, c_ptr, dt_ptr, bias_ptr, a_ptr, d_ptr, dstates_ptr, dlam_end_ptr,
    dlam_part_ptr, dy_ptr, pdx_ptr, dx_ptr, ddt_ptr, da_part_ptr, dbias_part_ptr, dd_part_ptr,
    pos_ptr, T, ROWS, H, G, P, N, num_chunks, transpoint, num_blocks, num_parts,
    sxb, sxt, sbb, sbt, scb, sct, sdb, sdt, sdyb, sdyt, spxb, spxt, lo, hi,
    L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_Q: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_LIMIT: tl.constexpr, A_LOG: tl.constexpr, HAS_D: tl.constexpr, D_PER_P: tl.constexpr,
    HAS_PDX: tl.constexpr, PACKED: tl.constexpr, IEEE: tl.constexpr,
):
    """The split chunk backward's second half, one program per (chunk, batch*head): dx =
    ((decay o C B^T)^T dy + exp(Lam_end - Lam) B dS_out^T) dt + D dy over P blocks, then ddt
    from dv.x and dLam (``_chunk_bwd_dbc_kernel``'s partials in order, plus the chunk-end
    partials), and the chunk's partial sums for dA, d dt_bias and dD, as the fused kernel."""
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
    prefix = in_t & (t < transpoint)
    mask_n = in_t[:, None] & (n[None, :] < N)
    bm = tl.load(b_ptr + b * sbb + t[:, None] * sbt + g * N + n[None, :], mask=mask_n, other=0.0)
    cm = tl.load(c_ptr + b * scb + t[:, None] * sct + g * N + n[None, :], mask=mask_n, other=0.0)
    dt, lam, z, a = _chunk_dt(dt_ptr, bias_ptr, a_ptr, b, h, t, T, sdb, sdt, lo, hi,
                              HAS_BIAS, SOFTPLUS, HAS_LIMIT, A_LOG)
    lam_end = _last(lam, L)
    e_src = tl.exp(lam_end - lam)
    causal = tl.arange(0, L)[:, None] >= tl.arange(0, L)[None, :]
    decay = tl.exp(tl.where(causal, lam[:, None] - lam[None, :], float("-inf")))      # [t, s]
    io = x_ptr.dtype.element_ty
    ws = tl.trans(decay * tl.dot(cm, tl.trans(bm), input_precision=precision)).to(io)  # [s, t]
    row = (b * num_chunks + c) * H + h
    ddt = tl.zeros([L], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask_p = p < P
        mask_x = in_t[:, None] & mask_p[None, :]
        x = tl.load(x_ptr + b * sxb + t[:, None] * sxt + h * P + p[None, :], mask=mask_x, other=0.0)
        dy = tl.load(dy_ptr + b * sdyb + t[:, None] * sdyt + h * P + p[None, :],
                     mask=rows[:, None] & mask_p[None, :], other=0.0).to(io)
        ds_out = tl.load(dstates_ptr + (row * P + p[:, None]) * N + n[None, :],
                         mask=mask_p[:, None] & (n[None, :] < N), other=0.0)
        dv = tl.dot(ws, dy, input_precision=precision)
        dv += e_src[:, None] * tl.dot(bm, tl.trans(ds_out.to(io)), input_precision=precision)
        dx = dv * dt[:, None]
        if HAS_D:
            tl.store(dd_part_ptr + row * P + p, tl.sum(dy.to(tl.float32) * x.to(tl.float32), axis=0),
                     mask=mask_p)
            if D_PER_P:
                d = tl.load(d_ptr + h * P + p, mask=mask_p, other=0.0).to(tl.float32)
                dx += d[None, :] * dy.to(tl.float32)
            else:
                dx += tl.load(d_ptr + h).to(tl.float32) * dy.to(tl.float32)
        if HAS_PDX:
            dx += tl.load(pdx_ptr + b * spxb + t[:, None] * spxt + h * P + p[None, :],
                          mask=prefix[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
        tl.store(dx_ptr + ((b * T + t[:, None]) * H + h) * P + p[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=mask_x)
        ddt += tl.sum(dv * x.to(tl.float32), axis=1)

    q = tl.arange(0, BLOCK_Q)
    dlam = tl.sum(tl.load(dlam_part_ptr + (row * num_parts + q[:, None]) * L + tl.arange(0, L)[None, :],
                          mask=(q < num_parts)[:, None], other=0.0), axis=0)
    e = tl.arange(0, BLOCK_E)
    dlam_end = tl.sum(tl.load(dlam_end_ptr + row * num_blocks + e, mask=e < num_blocks, other=0.0),
                      axis=0)
    dlam += tl.where(tl.arange(0, L) == L - 1, dlam_end, 0.0)
    da = tl.cumsum(dlam, axis=0, reverse=True)                                        # d(A dt_r)
    ddt += da * a
    tl.store(da_part_ptr + row, tl.sum(da * dt, axis=0))
    if HAS_LIMIT:
        pre = z
        if SOFTPLUS:
            pre = _softplus(z)
        ddt = tl.where((pre >= lo) & (pre <= hi), ddt, 0.0)
    if SOFTPLUS:
        ddt = tl.where(z > 20.0, ddt, ddt / (1.0 + tl.exp(-z)))
    ddt = tl.where(in_t, ddt, 0.0)
    tl.store(ddt_ptr + (b * T + t) * H + h, ddt.to(ddt_ptr.dtype.element_ty), mask=in_t)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + row, tl.sum(ddt, axis=0))


@triton.jit
def _ssd_finalize_kernel(
    da_part_ptr, dbias_part_ptr, dd_part_ptr, a_ptr, da_ptr, dbias_ptr, dd_ptr, R, H, P,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, A_LOG: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr,
):
    """dA (or dA_log = dA * A), d dt_bias and dD of head h: the chunk backward's partials
    summed over the R = batch * chunks rows, in a fixed order (the same bits every run)."""
    h = tl.program_id(0)
    r = tl.arange(0, BLOCK_R)
    acc_a = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_R], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        m = r0 + r < R
        acc_a += tl.load(da_part_ptr + (r0 + r) * H + h, mask=m, other=0.0)
        if HAS_BIAS:
            acc_b += tl.load(dbias_part_ptr + (r0 + r) * H + h, mask=m, other=0.0)
    da = tl.sum(acc_a, axis=0)
    if A_LOG:
        da *= -tl.exp(tl.load(a_ptr + h).to(tl.float32))
    tl.store(da_ptr + h, da.to(da_ptr.dtype.element_ty))
    if HAS_BIAS:
        tl.store(dbias_ptr + h, tl.sum(acc_b, axis=0).to(dbias_ptr.dtype.element_ty))
    if HAS_D:
        total = tl.zeros([BLOCK_P], dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            acc = tl.zeros([BLOCK_R, BLOCK_P], dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                acc += tl.load(dd_part_ptr + ((r0 + r[:, None]) * H + h) * P + p[None, :],
                               mask=(r0 + r[:, None] < R) & (p[None, :] < P), other=0.0)
            dd = tl.sum(acc, axis=0)
            if D_PER_P:
                tl.store(dd_ptr + h * P + p, dd.to(dd_ptr.dtype.element_ty), mask=p < P)
            else:
                total += dd
        if not D_PER_P:
            tl.store(dd_ptr + h, tl.sum(total, axis=0).to(dd_ptr.dtype.element_ty))


@triton.jit
def _group_sum_kernel(db_ptr, dc_ptr, db_out_ptr, dc_out_ptr, H, G, N, BLOCK_N: tl.constexpr):
    """dB and dC [B*T, G, N] in B's dtype: the per-head float32 gradients summed over each
    group's H/G heads, in head order."""
    bt, g = tl.program_id(0), tl.program_id(1)
    n = tl.arange(0, BLOCK_N)
    m = n < N
    acc_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_c = tl.zeros([BLOCK_N], dtype=tl.float32)
    per_group = H // G
    for k in range(per_group):
        off = (bt * H + g * per_group + k) * N + n
        acc_b += tl.load(db_ptr + off, mask=m, other=0.0)
        acc_c += tl.load(dc_ptr + off, mask=m, other=0.0)
    tl.store(db_out_ptr + (bt * G + g) * N + n, acc_b.to(db_out_ptr.dtype.element_ty), mask=m)
    tl.store(dc_out_ptr + (bt * G + g) * N + n, acc_c.to(dc_out_ptr.dtype.element_ty), mask=m)
