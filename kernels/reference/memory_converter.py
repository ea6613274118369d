"""The Memory Converter: the SSM state after the attention prefix, from its K, V and dt.

Paper eq. 7-9 (arXiv 2503.24067) with the dt factor eq. 9 leaves out (DESIGN section 1):

    S_{p-1} = sum_{s<p} exp(A * sum_{r=s+1}^{p-1} dt_r) * dt_s * x_s (outer) B_s

with the un-rotated K = B and V = x of tokens [0, p). It has no parameters and is exact: it is
the state the Mamba-2 recurrence S_t = exp(A dt_t) S_{t-1} + dt_t x_t B_t^T reaches after
token p-1, so the SSM segment continues as if it had run from the start. The torch backend's
forward, decoding (at the step after token p-1) and the exported Hugging Face model call this
function; the Triton backend fuses the same state into its SSD state passing.
"""

from __future__ import annotations

import torch
from torch import Tensor


def memory_converter(k: Tensor, v: Tensor, dt: Tensor, A: Tensor) -> Tensor:
    """SSM state after the prefix.

    Args:
        k: [B, p, G, N] keys of the prefix, un-rotated (= the SSM's B).
        v: [B, p, H, P] values of the prefix (= the SSM's x).
        dt: [B, p, H] step sizes after softplus and clamping.
        A: [H] negative decay rates.

    Returns:
        [B, H, P, N] state in float32 (float64 for float64 inputs).
    """
    batch, p, heads, head_dim = v.shape
    groups = k.shape[2]
    if k.shape[:2] != (batch, p) or dt.shape != (batch, p, heads) or A.shape != (heads,):
        raise ValueError(f"memory_converter: shapes k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"dt {tuple(dt.shape)}, A {tuple(A.shape)} do not fit [B,p,G,N], "
                         "[B,p,H,P], [B,p,H], [H]")
    if heads % groups:
        raise ValueError(f"memory_converter: heads H={heads} not divisible by groups G={groups}")
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    dt = dt.to(acc)
    # decay from token s to the end of the prefix: sum_{r=s+1}^{p-1} dt_r (reverse cumsum minus self)
    after = torch.flip(torch.cumsum(torch.flip(dt, [1]), dim=1), [1]) - dt        # [B, p, H]
    weight = torch.exp(after * A.to(acc)) * dt                                      # [B, p, H]
    k_heads = k.to(acc).repeat_interleave(heads // groups, dim=2)                   # [B, p, H, N]
    return torch.einsum("bsh,bshp,bshn->bhpn", weight, v.to(acc), k_heads)
