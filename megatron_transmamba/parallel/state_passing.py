"""State passing between context-parallel (CP) shards of the SSD scan: the math core of CP.

The SSD recurrence ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T`` (DESIGN.md; Dao & Gu 2024,
eq. 1 with scalar-times-identity A_t) is linear in the state, so a sequence cut into R
contiguous shards composes like the paper's chunk-level state passing (section 6, step 3)
one level up: shard r, scanned from a zero state, yields its local final state S_r and its
total log-decay ``l_r = sum_t dt_t A`` over its tokens, and the true state entering shard r is
``h_in(r) = exp(l_0 + ... + l_{r-1}) h_0 + sum_{q<r} exp(l_{q+1} + ... + l_{r-1}) S_q``,
the associative scan ``(a, S) o (a', S') = (a a', a' S + S')`` over shards. Decays are kept
as logs and every exponent is summed from its own terms (never a difference of prefix sums),
so a shard that forgets everything (l = -1e4) contributes exactly zero without NaN.
The distributed version will use these functions as follows: each CP rank scans its shard
from zero, calls ``shard_summary``, all-gathers every rank's (log_decay [B, H],
final_state [B, H, P, N]) over the CP group into [R, B, H] and [R, B, H, P, N], calls
``compose_initial_states`` and keeps row ``cp_rank``, then rescans its shard from that
initial state. The gathered tensors are small (no T), and the backward of the composition
(all-gather's backward is a reduce-scatter of state gradients) is what autograd derives from
these same functions; ``sharded_ssd_reference`` simulates the whole protocol in one process.
"""
import torch

from transmamba_kernels.ssd import chunk_ssd_naive
# float32, or float64 when any input is float64: the SSD references' precision
from transmamba_kernels.reference.ssd import scan_dtype

__all__ = ["shard_summary", "compose_initial_states", "sharded_ssd_reference"]


def shard_summary(dt, A, final_state):
    """What a shard contributes to the states of the shards after it.

    Args:
        dt: [B, T, H] processed time step of the shard's tokens (after dt_bias / softplus /
            dt_limit, as the scan saw it).
        A: [H] state decay rate (negative).
        final_state: [B, H, P, N] the shard's final state when scanned from a zero state.

    Returns:
        (log_decay, final_state): log_decay [B, H] = sum over T of dt * A, the log of the
        shard's total decay; final_state [B, H, P, N]. Both float32 (float64 for float64
        inputs).
    """
    if dt.dim() != 3 or A.shape != (dt.shape[2],):
        raise ValueError(f"dt must be [B, T, H] and A [H], got {tuple(dt.shape)} and {tuple(A.shape)}")
    batch, _, heads = dt.shape
    if final_state.dim() != 4 or final_state.shape[:2] != (batch, heads):
        raise ValueError(
            f"final_state must be [B, H, P, N] = [{batch}, {heads}, P, N], got {tuple(final_state.shape)}"
        )
    dtype = scan_dtype(dt, A, final_state)
    log_decay = (dt.to(dtype) * A.to(dtype)).sum(dim=1)  # [B, H]
    return log_decay, final_state.to(dtype)


def compose_initial_states(log_decays, final_states, initial_state=None):
    """The state entering every shard, from every shard's summary (all R at once).

    ``out[r] = exp(l_0 + ... + l_{r-1}) h_0 + sum_{q<r} exp(l_{q+1} + ... + l_{r-1}) S_q``;
    out[0] is h_0 (zeros when ``initial_state`` is None).

    Args:
        log_decays: [R, B, H] log total decay of each shard (``shard_summary``); -inf for a
            shard that forgets everything before it (a packed document starts in it).
        final_states: [R, B, H, P, N] each shard's final state from a zero start.
        initial_state: [B, H, P, N] state before the first token of shard 0, or None.

    Returns:
        [R, B, H, P, N] initial state of each shard, float32 (float64 for float64 inputs).
    """
    if log_decays.dim() != 3 or final_states.dim() != 5 or final_states.shape[:3] != log_decays.shape:
        raise ValueError(
            f"log_decays must be [R, B, H] and final_states [R, B, H, P, N] with the same R, B, H, "
            f"got {tuple(log_decays.shape)} and {tuple(final_states.shape)}"
        )
    if initial_state is not None and initial_state.shape != final_states.shape[1:]:
        raise ValueError(
            f"initial_state must be [B, H, P, N] = {list(final_states.shape[1:])}, "
            f"got {tuple(initial_state.shape)}"
        )
    dtype = scan_dtype(log_decays, final_states, initial_state)
    log_decays, final_states = log_decays.to(dtype), final_states.to(dtype)
    shards = log_decays.shape[0]
    index = torch.arange(shards, device=log_decays.device)
    # exponent[r, q] = l_{q+1} + ... + l_{r-1}, each summed from its own terms (q = -1 is h_0):
    # a masked cumsum instead of differencing one prefix sum, which would lose the small
    # decays next to a huge one.
    source = torch.arange(-1, shards, device=log_decays.device)  # [R + 1] q, -1 for h_0
    after_source = index[None, :] > source[:, None]  # [R + 1 (q), R (j)]
    terms = torch.where(after_source[..., None, None], log_decays[None], log_decays.new_zeros(()))
    inclusive = torch.cumsum(terms, dim=1)
    # [R + 1 (q), R (r), B, H]: sum over q < j < r, shifted rather than subtracted
    exclusive = torch.cat([torch.zeros_like(inclusive[:, :1]), inclusive[:, :-1]], dim=1)
    before_target = source[:, None] < index[None, :]  # [R + 1 (q), R (r)]
    weight = torch.where(before_target[..., None, None], torch.exp(exclusive), exclusive.new_zeros(()))
    states = final_states
    if initial_state is not None:
        states = torch.cat([initial_state.to(dtype)[None], final_states])  # [R + 1, B, H, P, N]
    else:
        weight = weight[1:]
    return torch.einsum("qrbh,qbhpn->rbhpn", weight, states)


def sharded_ssd_reference(x, dt, A, B, C, chunk_size, D=None, num_shards=1, initial_states=None,
                          return_final_states=False):
    """Single-process simulation of context-parallel SSD: equals ``chunk_ssd_naive`` on the
    whole sequence, forward and (through autograd) backward.

    The sequence is cut along T into ``num_shards`` equal contiguous shards; each is scanned
    from zero for its final state, the summaries are composed into every shard's initial
    state, and each shard is rescanned from it.

    Args:
        x: [B, T, H, P]; dt: [B, T, H] processed time step; A: [H] negative;
        B, C: [B, T, G, N]; chunk_size: as in ``chunk_ssd_naive``; D: [H] or [H, P] or None.
        num_shards: R, must divide T.
        initial_states: [B, H, P, N] state before the first token, or None for zeros.
        return_final_states: also return the state after the last token.

    Returns:
        y [B, T, H, P], or (y, final_states [B, H, P, N]) as ``chunk_ssd_naive`` returns them.
    """
    seqlen = x.shape[1]
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards <= 0:
        raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
    if seqlen % num_shards != 0:
        raise ValueError(f"num_shards = {num_shards} must divide the sequence length T = {seqlen}")
    length = seqlen // num_shards

    def shard(t, r):  # [B, T, ...] -> [B, T / R, ...]
        return t[:, r * length : (r + 1) * length]

    summaries = []
    for r in range(num_shards):
        _, local_final = chunk_ssd_naive(
            shard(x, r), shard(dt, r), A, shard(B, r), shard(C, r), chunk_size, return_final_states=True
        )
        summaries.append(shard_summary(shard(dt, r), A, local_final))
    log_decays = torch.stack([s[0] for s in summaries])  # [R, B, H]
    final_states = torch.stack([s[1] for s in summaries])  # [R, B, H, P, N]
    starts = compose_initial_states(log_decays, final_states, initial_states)  # [R, B, H, P, N]

    outputs = []
    for r in range(num_shards):
        y, final = chunk_ssd_naive(
            shard(x, r), shard(dt, r), A, shard(B, r), shard(C, r), chunk_size, D=D,
            initial_states=starts[r], return_final_states=True,
        )
        outputs.append(y)
    y = torch.cat(outputs, dim=1)
    return (y, final) if return_final_states else y
