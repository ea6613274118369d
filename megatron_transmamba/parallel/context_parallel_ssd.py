"""Context-parallel (CP) SSD scan across processes: the distributed form of ``state_passing``.

Each rank of the CP group holds one contiguous shard of the sequence (group rank r holds
tokens [r S, (r + 1) S)). The SSD recurrence ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T``
(Dao & Gu 2024, eq. 1 with scalar-times-identity A_t) is linear in the state, so the state
entering shard r is the associative scan over shards of the paper's chunk-level state passing
(section 6, step 3) one level up. ``context_parallel_ssd`` scans the local shard from a zero
state (``chunk_ssd_naive``), summarises it (``shard_summary``: log total decay [B, H] and
final state [B, H, P, N]), all-gathers every rank's summary in ONE autograd all-gather
(``cp_collectives.all_gather_rows``, whose backward sums every rank's gradient of
this rank's summary and hands it back, so d(final state) also reaches this rank through the
later ranks that used it), composes every shard's initial state (``compose_initial_states``),
keeps row r and rescans the shard from it; the first scan's output is discarded. Bytes moved
per SSD layer per rank, forward: one all-gather of R x B x (H + H P N) floats (float32, or
float64 for float64 inputs), with no T in it; the backward moves the same amount once more
(an all-to-all on gloo, a reduce-scatter on NCCL). Not done yet: the rescan could be replaced
by a correction of the first scan's outputs (``y += C_t exp(cumulative decay) h_in``, one
einsum instead of a second full scan); Triton kernels (this uses the plain-PyTorch
``chunk_ssd_naive``); the causal conv1d halo (the last d_conv - 1 tokens of shard r - 1,
needed before this scan); the attention prefix of TransMamba layers (tokens before the
TransPoint live on earlier ranks); the wiring into the mixer and into the parallel state
(creating the CP group, splitting the batch along T, ``seq_idx`` / packed documents and an
``initial_states`` for the first shard).
"""
import torch
import torch.distributed as dist

from megatron_transmamba.parallel.cp_collectives import all_gather_rows
from megatron_transmamba.parallel.state_passing import compose_initial_states, shard_summary
from transmamba_kernels.ssd import chunk_ssd_naive

__all__ = ["context_parallel_ssd"]


def _gather_summaries(log_decay, final_state, cp_group):
    """All-gather (log_decay [B, H], final_state [B, H, P, N]) into [R, B, H] and
    [R, B, H, P, N] in one autograd collective (packed as [B, H + H P N])."""
    batch, heads, head_dim, state_dim = final_state.shape
    packed = torch.cat([log_decay, final_state.reshape(batch, -1)], dim=1)  # [B, H + H P N]
    gathered = all_gather_rows(packed[:, None], cp_group).transpose(0, 1)  # [R, B, H + H P N]
    log_decays = gathered[..., :heads]  # [R, B, H]
    final_states = gathered[..., heads:].reshape(-1, batch, heads, head_dim, state_dim)
    return log_decays, final_states


def context_parallel_ssd(x, dt, A, B, C, chunk_size, D=None, cp_group=None):
    """SSD scan of one CP shard, equal to the matching slice of the full-sequence scan.

    Args:
        x: [B, S, H, P] this rank's shard of the inputs (S tokens; shards may differ in S).
        dt: [B, S, H] processed time step (after dt_bias / softplus / dt_limit).
        A: [H] state decay rate (negative), the same on every rank.
        B, C: [B, S, G, N] with G dividing H.
        chunk_size: as in ``chunk_ssd_naive``.
        D: [H] or [H, P] skip connection, or None.
        cp_group: the CP process group, ranks in sequence order; None or size 1 runs the plain
            ``chunk_ssd_naive``.

    Returns:
        y [B, S, H, P], this rank's slice of the full-sequence output. Differentiable with
        respect to every tensor argument; every rank of ``cp_group`` must run the backward
        (it is collective). Gradients of the replicated A and D are this rank's share: their
        sum over the CP group is the full-sequence gradient.
    """
    if cp_group is None or dist.get_world_size(group=cp_group) == 1:
        return chunk_ssd_naive(x, dt, A, B, C, chunk_size, D=D)
    _, local_final = chunk_ssd_naive(x, dt, A, B, C, chunk_size, return_final_states=True)
    log_decay, local_final = shard_summary(dt, A, local_final)
    log_decays, final_states = _gather_summaries(log_decay, local_final, cp_group)
    initial_state = compose_initial_states(log_decays, final_states)[dist.get_rank(group=cp_group)]
    return chunk_ssd_naive(x, dt, A, B, C, chunk_size, D=D, initial_states=initial_state)
