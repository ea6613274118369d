"""RMSNorm that works without apex and under sequence parallelism.

megatron-core's torch norm wrapper refuses sequence parallelism without apex (NOTES), so the
model uses this one everywhere: y = x / sqrt(mean(x^2) + eps) * weight, computed in float32.
Under sequence parallelism each rank holds a slice of the sequence, so the weight's gradient is
partial: the ``sequence_parallel`` attribute tells megatron-core to all-reduce it across the
tensor-parallel group (finalize_model_grads). With ``mixer_backend: triton`` the norm is the
fused Triton kernel (``transmamba_kernels.norm.gated_rmsnorm.rmsnorm_triton``: one pass forward
and backward where this PyTorch form launches about twenty kernels; the same float32 math).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(nn.Module):
    """RMSNorm with megatron-core's norm constructor signature ``(config, hidden_size, eps)``."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.fused = None                     # the Triton kernel with the triton backend
        if getattr(config, "mixer_backend", "torch") == "triton":
            from transmamba_kernels.norm.gated_rmsnorm import rmsnorm_triton

            self.fused = rmsnorm_triton
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: Tensor) -> Tensor:
        if self.fused is not None:
            return self.fused(x, self.weight, self.eps)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        h = x.to(acc)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.to(acc)).to(x.dtype)
