"""SwiGLU of the MLP (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6 without the
projections): the specification of the fused kernel.

The input is the fc1 output [..., 2F] in megatron-core's order: ``torch.chunk(x, 2, dim=-1)``
gives (x1, x2), and the output is SiLU(x1) * x2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def swiglu_naive(x: Tensor) -> Tensor:
    """x: [..., 2F] -> SiLU(x[..., :F]) * x[..., F:] as [..., F] in x's dtype (float32 math,
    float64 for float64 inputs)."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dim must be even (2F), got {x.shape[-1]}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x1, x2 = torch.chunk(x.to(acc), 2, dim=-1)
    return (F.silu(x1) * x2).to(x.dtype)
