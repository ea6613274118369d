"""Context-parallel (CP) SSD scan across processes: the distributed form of ``state_passing``.

Each rank of the CP group holds one contiguous shard of the sequence (group rank r holds
tokens [r S, (r + 1) S)). The SSD recurrence ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T``
(Dao & Gu 2024, eq. 1 with scalar-times-identity A_t) is linear in the state, so the state
entering shard r is the associative scan over shards of the paper's chunk-level state passing
(section 6, step 3) one level up. ``context_parallel_ssd`` scans the local shard from a zero
state, summarises it (``shard_summary``: log total decay [B, H] from the same processed dt the
scan read, and final state [B, H, P, N]), all-gathers every rank's summary in ONE autograd
all-gather (``cp_collectives.all_gather_rows``, whose backward sums every rank's gradient of
this rank's summary and hands it back, so d(final state) also reaches this rank through the
later ranks that used it), composes every shard's initial state (``compose_initial_states``),
keeps row r and rescans the shard from it; the first scan's output is not used. The scan is a
parameter (``SCANS``: the plain-PyTorch ``chunk_ssd_naive`` or the Triton ``chunk_ssd_triton``,
which skips output rows before ``transpoint``), so both mixer backends run this one protocol.
For a TransMamba layer the scan covers the whole shard: the Memory Converter's state at the
TransPoint p is the scan's state there, so only the outputs of tokens t < p are dropped.
Bytes moved per SSD layer per rank, forward: one all-gather of R x B x (H + H P N) floats
(float32, or float64 for float64 inputs), with no T in it; the backward moves the same amount
once more (an all-to-all on gloo, a reduce-scatter on NCCL).

Packed documents (``seq_idx`` and in-document ``position_ids`` of the shard; documents may
cross shards): both scans reset the state at every document start inside the shard. A row
whose shard holds a document start summarises to log decay -inf (nothing before that start
reaches later shards) and to the final state of its last document scanned from zero; a row
without one summarises as above. The composed state then enters only the row's first
document, and only when that document continues from the previous shard (its first position
is not 0): it is that document's initial state in the rescan (the scans' per-document
``initial_states``), every other document starts from zero. Not done: replacing the rescan by
a correction of the first scan's outputs (``y += C_t exp(cumulative decay) h_in``) and an
``initial_states`` for the first shard.
"""
import math

import torch
import torch.distributed as dist

from megatron_transmamba.parallel.cp_collectives import all_gather_rows
from megatron_transmamba.parallel.state_passing import compose_initial_states, shard_summary
from transmamba_kernels.ssd import chunk_ssd_naive

__all__ = ["context_parallel_ssd", "naive_scan", "triton_scan", "SCANS"]


def naive_scan(x, dt, A, B, C, chunk_size, D=None, initial_states=None,
               return_final_states=False, transpoint=0, seq_idx=None):
    """``chunk_ssd_naive`` with the Triton scan's signature; it computes the output rows before
    ``transpoint`` too (the caller does not read them)."""
    return chunk_ssd_naive(x, dt, A, B, C, chunk_size, D=D, initial_states=initial_states,
                           seq_idx=seq_idx, return_final_states=return_final_states)


def triton_scan(x, dt, A, B, C, chunk_size, D=None, initial_states=None,
                return_final_states=False, transpoint=0, seq_idx=None):
    """``chunk_ssd_triton`` on processed dt: output rows before ``transpoint`` (counted in
    each document with ``seq_idx``) are zeros."""
    from transmamba_kernels.ssd.chunk import chunk_ssd_triton

    return chunk_ssd_triton(x, dt, A, B, C, chunk_size, D=D, initial_states=initial_states,
                            seq_idx=seq_idx, return_final_states=return_final_states,
                            transpoint=transpoint)


# mixer_backend -> the scan context_parallel_ssd runs
SCANS = {"torch": naive_scan, "triton": triton_scan}


def _gather_summaries(log_decay, final_state, cp_group):
    """All-gather (log_decay [B, H], final_state [B, H, P, N]) into [R, B, H] and
    [R, B, H, P, N] in one autograd collective (packed as [B, H + H P N])."""
    batch, heads, head_dim, state_dim = final_state.shape
    packed = torch.cat([log_decay, final_state.reshape(batch, -1)], dim=1)  # [B, H + H P N]
    gathered = all_gather_rows(packed[:, None], cp_group).transpose(0, 1)  # [R, B, H + H P N]
    log_decays = gathered[..., :heads]  # [R, B, H]
    final_states = gathered[..., heads:].reshape(-1, batch, heads, head_dim, state_dim)
    return log_decays, final_states


def context_parallel_ssd(x, dt, A, B, C, chunk_size, D=None, cp_group=None, scan=naive_scan,
                         transpoint=0, seq_idx=None, position_ids=None):
    """SSD scan of one CP shard, equal to the matching slice of the full-sequence scan.

    Args:
        x: [B, S, H, P] this rank's shard of the inputs (S tokens; shards may differ in S).
        dt: [B, S, H] processed time step (after dt_bias / softplus / dt_limit): the scan and
            the shard's log decay read the same values.
        A: [H] state decay rate (negative), the same on every rank.
        B, C: [B, S, G, N] with G dividing H.
        chunk_size: as in ``scan``.
        D: [H] or [H, P] skip connection, or None.
        cp_group: the CP process group, ranks in sequence order; None or size 1 runs the plain
            ``scan``.
        scan: ``naive_scan`` or ``triton_scan`` (``SCANS``), or any function of their signature.
        transpoint: local index of this shard's first output row that is read; rows before it
            may be zeros (the Triton scan skips them; with documents it counts from each
            document's first local token). States always cover every row.
        seq_idx, position_ids: [B, S] packed documents (both or neither): each token's
            document index, non-decreasing along S, and its position inside the whole document
            (a document started on an earlier rank continues its count).

    Returns:
        y [B, S, H, P], this rank's slice of the full-sequence output (rows >= transpoint).
        Differentiable with respect to every tensor argument; every rank of ``cp_group`` must
        run the backward (it is collective). Gradients of the replicated A and D are this
        rank's share: their sum over the CP group is the full-sequence gradient.
    """
    if (seq_idx is None) != (position_ids is None):
        raise ValueError("context_parallel_ssd: pass seq_idx and position_ids together")
    documents = {} if seq_idx is None else {"seq_idx": seq_idx}
    if cp_group is None or dist.get_world_size(group=cp_group) == 1:
        return scan(x, dt, A, B, C, chunk_size, D=D, transpoint=transpoint, **documents)
    # outputs of the first scan are never read: the Triton scan skips them all
    _, local_final = scan(x, dt, A, B, C, chunk_size, return_final_states=True,
                          transpoint=x.shape[1], **documents)
    if seq_idx is not None:     # one final state per document: keep each row's last
        first_doc, last_doc = _row_documents(seq_idx)
        document_finals = local_final
        local_final = document_finals.index_select(0, last_doc)
    log_decay, local_final = shard_summary(dt, A, local_final)
    if seq_idx is not None:     # a document start cuts what came before it off
        log_decay = log_decay.masked_fill((position_ids == 0).any(dim=1)[:, None], -math.inf)
    log_decays, final_states = _gather_summaries(log_decay, local_final, cp_group)
    initial_state = compose_initial_states(log_decays, final_states)[dist.get_rank(group=cp_group)]
    if seq_idx is not None:     # only a first document that continues from the last shard
        continues = (position_ids[:, 0] > 0).to(initial_state.dtype)[:, None, None, None]
        initial_state = torch.zeros_like(document_finals, dtype=initial_state.dtype).index_copy(
            0, first_doc, initial_state * continues)                  # [num_docs, H, P, N]
    return scan(x, dt, A, B, C, chunk_size, D=D, initial_states=initial_state,
                transpoint=transpoint, **documents)


def _row_documents(seq_idx):
    """(first, last) [B] indices of each row's first and last document in the scans' numbering
    (documents in order of appearance, row by row)."""
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    per_row = starts.sum(dim=1)
    first = torch.cumsum(per_row, 0) - per_row
    return first, first + per_row - 1
