"""RMSNorm that works without apex and under sequence parallelism, and the fused residual stream.

megatron-core's torch norm wrapper refuses sequence parallelism without apex (NOTES), so the
model uses this one everywhere: y = x / sqrt(mean(x^2) + eps) * weight, computed in float32
(``transmamba_kernels.reference.norm.rmsnorm_naive``, the one PyTorch form).
Under sequence parallelism each rank holds a slice of the sequence, so the weight's gradient is
partial: the ``sequence_parallel`` attribute tells megatron-core to all-reduce it across the
tensor-parallel group (finalize_model_grads). With ``mixer_backend: triton`` the norm is the
fused Triton kernel (``transmamba_kernels.norm.rmsnorm.rmsnorm_triton``: one pass forward
and backward where this PyTorch form launches about twenty kernels; the same float32 math).

The residual stream (mamba_ssm's ``fused_add_norm``): a stack of pre-norm blocks
``x_{i+1} = x_i + f_i(norm_i(x_i))`` can carry (hidden, residual) with ``x_i = hidden +
residual`` and let block i compute ``normed, residual = add_and_norm(hidden, residual)``, so the
residual add and the next norm are one kernel (``add_rmsnorm_triton``) forward and backward,
where the backward also adds the residual's gradient (no separate gradient-accumulation add).
A layer's ``residual`` argument says which form its caller uses (``PLAIN`` by default).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from megatron.core.transformer.transformer_config import TransformerConfig

from transmamba_kernels.reference.norm import rmsnorm_naive

PLAIN = object()
"""Default of a layer's ``residual`` argument: the caller passes the plain hidden stream x and
gets back x + f(norm(x)). Any other value (a tensor, or None for a stack's first layer) is the
residual stream: the layer returns (f(norm(x)), x) with x = hidden + residual."""


def residual_stream_applies(config: TransformerConfig) -> bool:
    """The model carries the residual stream (one ``add_rmsnorm`` kernel per layer) under the
    triton backend when every residual add is a plain add: no hidden dropout, no linear biases
    (megatron's bias-dropout-add) and no float32 residual copy. Otherwise each layer adds."""
    return (getattr(config, "mixer_backend", "torch") == "triton" and not config.hidden_dropout
            and not config.add_bias_linear and not config.fp32_residual_connection)


class RMSNorm(nn.Module):
    """RMSNorm with megatron-core's norm constructor signature ``(config, hidden_size, eps)``."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.fused = self.fused_add = None    # the Triton kernels with the triton backend
        if getattr(config, "mixer_backend", "torch") == "triton":
            from transmamba_kernels.norm.rmsnorm import add_rmsnorm_triton, rmsnorm_triton

            self.fused, self.fused_add = rmsnorm_triton, add_rmsnorm_triton
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: Tensor) -> Tensor:
        if self.fused is not None:
            return self.fused(x, self.weight, self.eps)
        return rmsnorm_naive(x, self.weight, self.eps)

    def add_and_norm(self, x: Tensor, residual: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """(norm(x + residual), x + residual) for x, residual [..., d] (residual None: (norm(x),
        x)); the sum in the residual's dtype, as the unfused ``residual + x`` is. One kernel each
        way with the triton backend."""
        if self.fused_add is not None:
            return self.fused_add(x, residual, self.weight, self.eps)
        summed = x if residual is None else residual + x
        return self(summed), summed
