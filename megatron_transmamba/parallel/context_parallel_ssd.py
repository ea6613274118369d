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
once more (an all-to-all on gloo, a reduce-scatter on NCCL). Not done: replacing the rescan
by a correction of the first scan's outputs (``y += C_t exp(cumulative decay) h_in``), packed
documents (``seq_idx``) and an ``initial_states`` for the first shard.
"""
import torch
import torch.distributed as dist

from megatron_transmamba.parallel.cp_collectives import all_gather_rows
from megatron_transmamba.parallel.state_passing import compose_initial_states, shard_summary
from transmamba_kernels.ssd import chunk_ssd_naive

__all__ = ["context_parallel_ssd", "naive_scan", "triton_scan", "SCANS"]


def naive_scan(x, dt, A, B, C, chunk_size, D=None, initial_states=None,
               return_final_states=False, transpoint=0):
    """``chunk_ssd_naive`` with the Triton scan's signature; it computes the output rows before
    ``transpoint`` too (the caller does not read them)."""
    return chunk_ssd_naive(x, dt, A, B, C, chunk_size, D=D, initial_states=initial_states,
                           return_final_states=return_final_states)


def triton_scan(x, dt, A, B, C, chunk_size, D=None, initial_states=None,
                return_final_states=False, transpoint=0):
    """``chunk_ssd_triton`` on processed dt: output rows before ``transpoint`` are zeros."""
    from transmamba_kernels.ssd.chunk import chunk_ssd_triton

    return chunk_ssd_triton(x, dt, A, B, C, chunk_size, D=D, initial_states=initial_states,
                            return_final_states=return_final_states, transpoint=transpoint)


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
                         transpoint=0):
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
            may be zeros (the Triton scan skips them). States always cover every row.

    Returns:
        y [B, S, H, P], this rank's slice of the full-sequence output (rows >= transpoint).
        Differentiable with respect to every tensor argument; every rank of ``cp_group`` must
        run the backward (it is collective). Gradients of the replicated A and D are this
        rank's share: their sum over the CP group is the full-sequence gradient.
    """
    if cp_group is None or dist.get_world_size(group=cp_group) == 1:
        return scan(x, dt, A, B, C, chunk_size, D=D, transpoint=transpoint)
    # outputs of the first scan are never read: the Triton scan skips them all
    _, local_final = scan(x, dt, A, B, C, chunk_size, return_final_states=True,
                          transpoint=x.shape[1])
    log_decay, local_final = shard_summary(dt, A, local_final)
    log_decays, final_states = _gather_summaries(log_decay, local_final, cp_group)
    initial_state = compose_initial_states(log_decays, final_states)[dist.get_rank(group=cp_group)]
    return scan(x, dt, A, B, C, chunk_size, D=D, initial_states=initial_state,
                transpoint=transpoint)
