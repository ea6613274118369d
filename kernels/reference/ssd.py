"""Plain-PyTorch references for the Mamba-2 SSD scan, the specification of the SSD kernels.

The scans compute the selective state space recurrence of Mamba-2 (Dao & Gu 2024,
"Transformers are SSMs", eq. 1 with A_t = exp(A dt_t) a scalar times identity; DESIGN.md 1.5):
``S_t = exp(A dt_t) S_{t-1} + dt_t x_t (x) B_t`` and ``y_t = S_t C_t + D x_t``, optionally
gated by ``silu(z_t)``. ``ssd_recurrent_naive`` runs it token by token and is the spec;
``chunk_ssd_naive`` computes the same function with the chunked SSD algorithm (paper section 6:
quadratic attention-like part inside each chunk under the segment-sum decay mask, chunk
states, state passing between chunks, output from the passed states) and is the CPU fast
path. Both take mamba_ssm's ``mamba_chunk_scan_combined`` arguments. Packed documents
(``cu_seqlens`` and/or ``seq_idx``) reset the state at every document start; document d
then starts from ``initial_states[d]`` and gets its own final state. Documents are numbered
in order of appearance, row by row. A zero-length document (repeated ``cu_seqlens`` offset)
is allowed: its final state is its initial state.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["ssd_recurrent_naive", "chunk_ssd_naive", "ssd_step_naive"]

_NO_DT_LIMIT = (0.0, float("inf"))


@dataclass
class _Dims:
    batch: int
    seqlen: int
    heads: int
    head_dim: int
    groups: int
    state_dim: int


@dataclass
class _Document:
    row: int  # batch row holding the document
    start: int  # first token, inclusive
    end: int  # last token, exclusive


def _shape_error(name, expected, tensor):
    return ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")


def _check_inputs(x, dt, A, B, C, D, z, dt_bias, dt_limit):
    if x.dim() != 4:
        raise _shape_error("x", "[B, T, H, P]", x)
    batch, seqlen, heads, head_dim = x.shape
    if B.dim() != 4 or B.shape[:2] != (batch, seqlen):
        raise _shape_error("B", f"[B, T, G, N] = [{batch}, {seqlen}, G, N]", B)
    groups, state_dim = B.shape[2], B.shape[3]
    if groups == 0 or heads % groups != 0:
        expected = f"[B, T, G, N] with G dividing H = {heads} (head h reads group h // (H // G))"
        raise _shape_error("B", expected, B)
    if C.shape != B.shape:
        raise _shape_error("C", f"[B, T, G, N] = {list(B.shape)} (same as B)", C)
    if dt.shape != (batch, seqlen, heads):
        raise _shape_error("dt", f"[B, T, H] = [{batch}, {seqlen}, {heads}]", dt)
    if A.shape != (heads,):
        raise _shape_error("A", f"[H] = [{heads}]", A)
    if D is not None and D.shape not in ((heads,), (heads, head_dim)):
        raise _shape_error("D", f"[H] = [{heads}] or [H, P] = [{heads}, {head_dim}]", D)
    if z is not None and z.shape != x.shape:
        raise _shape_error("z", f"[B, T, H, P] = {list(x.shape)} (same as x)", z)
    if dt_bias is not None and dt_bias.shape != (heads,):
        raise _shape_error("dt_bias", f"[H] = [{heads}]", dt_bias)
    if len(dt_limit) != 2:
        raise ValueError(f"dt_limit must be a pair (min, max), got {dt_limit!r}")
    return _Dims(batch, seqlen, heads, head_dim, groups, state_dim)


def _documents(dims, seq_idx, cu_seqlens):
    """The documents as (row, start, end), row by row; one per row when nothing is packed."""
    batch, seqlen = dims.batch, dims.seqlen
    if seq_idx is not None:
        if seq_idx.shape != (batch, seqlen) or seq_idx.is_floating_point():
            raise ValueError(
                f"seq_idx must be an integer tensor of shape [B, T] = [{batch}, {seqlen}], "
                f"got {seq_idx.dtype} {tuple(seq_idx.shape)}"
            )
        decreasing = torch.nonzero(seq_idx[:, 1:] < seq_idx[:, :-1])
        if len(decreasing) > 0:
            row, t = decreasing[0].tolist()
            raise ValueError(
                f"seq_idx must be non-decreasing along T (documents are contiguous), "
                f"got {seq_idx[row, t].item()} then {seq_idx[row, t + 1].item()} in row {row} at t = {t + 1}"
            )
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(
                f"cu_seqlens must be an integer tensor of shape [num_docs + 1], "
                f"got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
            )
        if batch != 1:
            raise ValueError(f"cu_seqlens requires batch size 1 (x of shape [1, T, H, P]), got batch {batch}")
        offsets = cu_seqlens.tolist()
        if offsets[0] != 0 or offsets[-1] != seqlen or any(a > b for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"cu_seqlens must be non-decreasing from 0 to T = {seqlen}, got {offsets}")
        docs = [_Document(0, s, e) for s, e in zip(offsets[:-1], offsets[1:])]
        if seq_idx is not None:
            starts = [s for s, e in zip(offsets[:-1], offsets[1:]) if e > s and s > 0]
            changes = (torch.nonzero(seq_idx[0, 1:] != seq_idx[0, :-1]).flatten() + 1).tolist()
            if starts != changes:
                raise ValueError(
                    f"seq_idx must start documents where cu_seqlens does, at t = {starts}, got {changes}"
                )
        return docs
    if seq_idx is not None:
        docs = []
        for row in range(batch):
            changes = (torch.nonzero(seq_idx[row, 1:] != seq_idx[row, :-1]).flatten() + 1).tolist()
            bounds = [0] + changes + [seqlen]
            docs += [_Document(row, s, e) for s, e in zip(bounds[:-1], bounds[1:])]
        return docs
    return [_Document(row, 0, seqlen) for row in range(batch)]


def _check_initial_states(initial_states, dims, num_docs, packed):
    if initial_states is None:
        return
    expected = (num_docs, dims.heads, dims.head_dim, dims.state_dim)
    if initial_states.shape != expected:
        rows = "num_docs" if packed else "B"
        raise _shape_error("initial_states", f"[{rows}, H, P, N] = {list(expected)}", initial_states)


def scan_dtype(*tensors):
    """float64 when any input is float64, float32 otherwise (bf16/fp16 are upcast)."""
    dtype = torch.float32
    for tensor in tensors:
        if tensor is not None:
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _discretize_dt(dt, dt_bias, dt_softplus, dt_limit):
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    # mamba_ssm leaves dt unclamped under the default limit, so a raw negative dt stays negative.
    if tuple(dt_limit) != _NO_DT_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


@dataclass
class _ChunkLayout:
    """Where each token sits once documents are cut into chunks that never span two documents.

    Every document starts a fresh chunk and is zero-padded to a whole number of chunks (at
    least one); the documents of a batch row follow each other along that row's chunks.
    Padding tokens have dt = 0: no decay and no input, so a document's last chunk ends on
    its last real token's state.
    """

    rows: int
    num_chunks: int  # chunks per row
    source: torch.Tensor  # [rows * num_chunks * L] token index into [B * T], B * T = padding
    target: torch.Tensor  # [B * T] position of each token in the flattened chunks
    starts: torch.Tensor  # [rows, num_chunks] bool, the chunk begins a document
    doc_of_chunk: torch.Tensor  # [rows, num_chunks] document index of each chunk
    last_chunk: torch.Tensor  # [num_docs] flat chunk index (row * num_chunks + c) of each document's end


def _chunk_layout(docs, dims, chunk_size, device):
    used = [0] * dims.batch
    first_chunk, doc_chunks = [], []
    for doc in docs:
        doc_chunks.append(max(1, -(-(doc.end - doc.start) // chunk_size)))
        first_chunk.append(used[doc.row])
        used[doc.row] += doc_chunks[-1]
    rows, num_chunks = dims.batch, max(used)
    source = torch.full((rows * num_chunks * chunk_size,), dims.batch * dims.seqlen, dtype=torch.long)
    target = torch.empty(dims.batch * dims.seqlen, dtype=torch.long)
    starts = torch.zeros(rows, num_chunks, dtype=torch.bool)
    doc_of_chunk = torch.zeros(rows, num_chunks, dtype=torch.long)
    last_chunk = []
    for d, (doc, first, n) in enumerate(zip(docs, first_chunk, doc_chunks)):
        offsets = torch.arange(doc.end - doc.start)
        begin = (doc.row * num_chunks + first) * chunk_size
        tokens = doc.row * dims.seqlen + doc.start + offsets
        source[begin + offsets] = tokens
        target[tokens] = begin + offsets
        starts[doc.row, first] = True
        doc_of_chunk[doc.row, first : first + n] = d
        last_chunk.append(doc.row * num_chunks + first + n - 1)
    return _ChunkLayout(
        rows,
        num_chunks,
        source.to(device),
        target.to(device),
        starts.to(device),
        doc_of_chunk.to(device),
        torch.tensor(last_chunk, dtype=torch.long, device=device),
    )


def _skip_and_gate(y, x, D, z):
    # y, x, z: [B, T, H, P]; D: [H] or [H, P]
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z)
    return y


def _segsum(a):
    """out[..., i, j] = a[..., j+1] + ... + a[..., i] for j <= i, -inf above the diagonal.

    a: [..., L] -> [..., L, L]. Summing masked copies (instead of differencing one cumsum)
    keeps each entry exact to rounding, and exp(-inf) = 0 makes the upper triangle vanish.
    """
    length = a.shape[-1]
    a = a[..., None].expand(*a.shape, length)  # [..., L (summed index k), L (column j)]
    strictly_lower = torch.ones(length, length, dtype=torch.bool, device=a.device).tril(-1)
    out = torch.cumsum(a.masked_fill(~strictly_lower, 0), dim=-2)
    lower = torch.ones(length, length, dtype=torch.bool, device=a.device).tril()
    return out.masked_fill(~lower, -math.inf)


def _recurrence(state, x, dt, A, B, C):
    """One token of the recurrence: S = exp(A dt) S + dt x (x) B, y = S C (no D skip, no gate).

    state [B, H, P, N]; x [B, H, P]; dt [B, H]; A [H]; B, C [B, H, N] (already one per head).
    Returns (new state, y [B, H, P]).
    """
    state = torch.exp(A * dt)[..., None, None] * state + (x * dt[..., None])[..., None] * B[:, :, None]
    return state, torch.einsum("bhpn,bhn->bhp", state, C)


def ssd_step_naive(state, x, dt, A, B, C, D=None, z=None):
    """One decoding step of the scan from a cached state: ``ssd_recurrent_naive`` for T = 1.

    Args:
        state: [B, H, P, N] state after the previous token (the cache's dtype, float32 for a
            float32 / bf16 / fp16 model, float64 for a float64 one).
        x: [B, H, P]; dt: [B, H] processed (after dt_bias, softplus and dt_limit); A: [H].
        B, C: [B, G, N]; head h reads group h // (H // G).
        D: [H] or [H, P] skip, or None; z: [B, H, P] gate, or None.

    Returns:
        (y [B, H, P] in x's dtype, new state [B, H, P, N] in state's dtype). The math runs in
        float32, or float64 when any input is float64 (as in the scans).
    """
    if x.dim() != 3 or state.shape != (*x.shape, B.shape[-1]):
        raise ValueError(f"ssd_step_naive: state {tuple(state.shape)} and x {tuple(x.shape)} must "
                         "be [B, H, P, N] and [B, H, P]")
    heads = x.shape[1]
    dtype = scan_dtype(state, x, dt, A, B, C, D, z)
    acc = [None if t is None else t.to(dtype) for t in (state, x, dt, A, B, C, D, z)]
    s, x_, dt, A, B, C, D, z = acc
    per_head = heads // B.shape[1]
    new, y = _recurrence(s, x_, dt, A, B.repeat_interleave(per_head, 1),
                         C.repeat_interleave(per_head, 1))
    y = _skip_and_gate(y[:, None], x_[:, None], D, None if z is None else z[:, None])[:, 0]
    return y.to(x.dtype), new.to(state.dtype)


def _prepare_scan(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                  dt_softplus, dt_limit):
    """The scans' shared prologue: check the inputs, find the documents, cast everything to the
    scan dtype and process dt. Returns (dims, docs, x's dtype, (x, dt [B, T, H] processed, A, B,
    C, D, z, initial_states))."""
    dims = _check_inputs(x, dt, A, B, C, D, z, dt_bias, dt_limit)
    packed = seq_idx is not None or cu_seqlens is not None
    docs = _documents(dims, seq_idx, cu_seqlens)
    _check_initial_states(initial_states, dims, len(docs), packed)
    out_dtype = x.dtype
    dtype = scan_dtype(x, dt, A, B, C, D, z, dt_bias, initial_states)
    x, dt, A, B, C, D, z, dt_bias, initial_states = (
        None if t is None else t.to(dtype) for t in (x, dt, A, B, C, D, z, dt_bias, initial_states)
    )
    dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit)  # [B, T, H]
    return dims, docs, out_dtype, (x, dt, A, B, C, D, z, initial_states)


def ssd_recurrent_naive(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    seq_idx=None,
    cu_seqlens=None,
    dt_softplus=False,
    dt_limit=_NO_DT_LIMIT,
    return_final_states=False,
):
    """Token-by-token Mamba-2 scan: the specification.

    Args:
        x: [B, T, H, P] input (value) per head.
        dt: [B, T, H] raw time step, before dt_bias / softplus / dt_limit.
        A: [H] state decay rate (negative).
        B: [B, T, G, N] input projection (key); head h reads group h // (H // G).
        C: [B, T, G, N] output projection (query).
        D: [H] or [H, P] skip connection, or None.
        z: [B, T, H, P] gate, the output is multiplied by silu(z); or None.
        dt_bias: [H] added to dt before softplus; or None.
        initial_states: [B, H, P, N] state before the first token, or [num_docs, H, P, N]
            (one per document) when packed; None means zeros.
        seq_idx: [B, T] integer document id per token, non-decreasing along T; or None.
        cu_seqlens: [num_docs + 1] integer document offsets into T (requires B = 1); or None.
        dt_softplus: apply softplus to dt + dt_bias.
        dt_limit: (min, max) clamp of the processed dt, skipped for the default (0, inf).
        return_final_states: also return the state after the last token.

    Returns:
        y: [B, T, H, P] in x's dtype, or (y, final_states) with final_states [B, H, P, N]
        ([num_docs, H, P, N] when packed) in float32, or float64 for float64 inputs.
    """
    dims, docs, out_dtype, (x, dt, A, B, C, D, z, initial_states) = _prepare_scan(
        x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_softplus, dt_limit)
    batch, seqlen, heads, head_dim = x.shape
    state_dim = dims.state_dim
    heads_per_group = heads // dims.groups
    B = B.repeat_interleave(heads_per_group, dim=2)  # [B, T, H, N]
    C = C.repeat_interleave(heads_per_group, dim=2)  # [B, T, H, N]
    if initial_states is None:
        initial_states = x.new_zeros(len(docs), heads, head_dim, state_dim)

    # Host-side bookkeeping: which document each token belongs to, where documents start/end.
    doc_of_token = torch.zeros(batch, seqlen, dtype=torch.long)
    doc_starts = torch.zeros(batch, seqlen, dtype=torch.bool)
    docs_ending_at = [[] for _ in range(seqlen)]
    for d, doc in enumerate(docs):
        if doc.end > doc.start:
            doc_of_token[doc.row, doc.start : doc.end] = d
            doc_starts[doc.row, doc.start] = True
            docs_ending_at[doc.end - 1].append(d)
    start_times = set(torch.nonzero(doc_starts.any(0)).flatten().tolist())
    doc_of_token, doc_starts = doc_of_token.to(x.device), doc_starts.to(x.device)

    final_states = list(initial_states.unbind(0))  # an empty document keeps its initial state
    state = x.new_zeros(batch, heads, head_dim, state_dim)  # [B, H, P, N]
    ys = []
    for t in range(seqlen):
        if t in start_times:  # a document starts here in some row: reload its initial state
            fresh = initial_states[doc_of_token[:, t]]
            state = torch.where(doc_starts[:, t, None, None, None], fresh, state)
        state, y_t = _recurrence(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y_t)  # [B, H, P]
        for d in docs_ending_at[t]:
            final_states[d] = state[docs[d].row]
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(batch, 0, heads, head_dim)  # [B, T, H, P]
    y = _skip_and_gate(y, x, D, z).to(out_dtype)
    return (y, torch.stack(final_states)) if return_final_states else y


def chunk_ssd_naive(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    seq_idx=None,
    cu_seqlens=None,
    dt_softplus=False,
    dt_limit=_NO_DT_LIMIT,
    return_final_states=False,
):
    """Chunked SSD scan: the same function as ``ssd_recurrent_naive``, vectorised over chunks.

    Arguments and returns as in ``ssd_recurrent_naive``, plus ``chunk_size`` (> 0), the
    length of the chunks inside which outputs are computed in the quadratic, attention-like
    form. Any T works (documents are padded internally). Differentiable by autograd with
    respect to every tensor argument.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    dims, docs, out_dtype, (x, dt, A, B, C, D, z, initial_states) = _prepare_scan(
        x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_softplus, dt_limit)
    batch, seqlen, heads, head_dim = x.shape
    state_dim = dims.state_dim
    groups, heads_per_group = dims.groups, dims.heads // dims.groups
    layout = _chunk_layout(docs, dims, chunk_size, x.device)
    R, NC, L = layout.rows, layout.num_chunks, chunk_size

    def to_chunks(t):  # [B, T, ...] -> [R, NC, L, ...], zero at padding
        flat = t.reshape(batch * seqlen, *t.shape[2:])
        flat = torch.cat([flat, flat.new_zeros(1, *t.shape[2:])])
        return flat[layout.source].view(R, NC, L, *t.shape[2:])

    # Heads are split as (G, H/G) so one group's B and C serve its H/G heads without copies.
    x_dt = to_chunks(x * dt[..., None]).view(R, NC, L, groups, heads_per_group, head_dim)
    a = to_chunks(A * dt).permute(0, 1, 3, 2)  # [R, NC, H, L] log decay of each token
    B = to_chunks(B)  # [R, NC, L, G, N]
    C = to_chunks(C)  # [R, NC, L, G, N]
    a_cumsum = torch.cumsum(a, dim=-1)  # [R, NC, H, L]

    def per_token(t):  # [R, NC, H, L] -> [R, NC, L, G, H/G, 1], to scale x-shaped tensors
        return t.permute(0, 1, 3, 2).reshape(R, NC, L, groups, heads_per_group, 1)

    # 1. Inside each chunk: causal "attention" C_l . B_s under the decay mask exp(segsum).
    scores = torch.einsum("rclgn,rcsgn->rcgls", C, B)  # [R, NC, G, L, L]
    decay = torch.exp(_segsum(a)).view(R, NC, groups, heads_per_group, L, L)
    y_diag = torch.einsum("rcghls,rcsghp->rclghp", scores[:, :, :, None] * decay, x_dt)

    # 2. Each chunk's own contribution to the state at its end.
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)  # [R, NC, H, L]
    chunk_states = torch.einsum("rclgn,rclghp->rcghpn", B, x_dt * per_token(decay_to_end))
    chunk_states = chunk_states.reshape(R, NC, heads, head_dim, state_dim)

    # 3. Pass states between chunks; a document's first chunk starts from its initial state.
    chunk_decay = torch.exp(a_cumsum[..., -1])  # [R, NC, H]
    state = x.new_zeros(R, heads, head_dim, state_dim)
    start_states, end_states = [], []
    for c in range(NC):
        fresh = 0.0 if initial_states is None else initial_states[layout.doc_of_chunk[:, c]]
        state = torch.where(layout.starts[:, c, None, None, None], fresh, state)
        start_states.append(state)
        state = chunk_decay[:, c, :, None, None] * state + chunk_states[:, c]
        end_states.append(state)
    start_states = torch.stack(start_states, dim=1)  # [R, NC, H, P, N]

    # 4. Each token reads the state its chunk started from, decayed up to the token.
    start_states = start_states.view(R, NC, groups, heads_per_group, head_dim, state_dim)
    y_off = torch.einsum("rclgn,rcghpn->rclghp", C, start_states) * per_token(torch.exp(a_cumsum))

    y = (y_diag + y_off).reshape(R * NC * L, heads, head_dim)[layout.target]
    y = _skip_and_gate(y.view(batch, seqlen, heads, head_dim), x, D, z).to(out_dtype)
    if not return_final_states:
        return y
    final_states = torch.stack(end_states, dim=1).reshape(R * NC, heads, head_dim, state_dim)
    return y, final_states[layout.last_chunk]
