"""The scalars of one optimizer step, from megatron-core's clipping (``get_grad_norm_fp32``
and ``clip_grad_by_total_norm_fp32``): the specification of the fused kernel.

Given the all-reduced squared gradient norm of each optimizer part, the step's loss and its
SIGTERM flag: the global norm (float64, as megatron-core's host math: the root of each part's
sum, then the root of the sum of their squares when the parts were reduced separately), the
clip scale min(1, max_norm / (norm + 1e-6)) as the float32 that multiplies the gradients, and
whether the step must be skipped (a NaN or inf loss or norm) as torch's fused Adam's
``found_inf`` (1.0 or 0.0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def step_scalars_naive(squared_norms: Tensor, loss: Tensor, stop_flag: Tensor, max_norm: float,
                       separate_parts: bool) -> tuple[Tensor, Tensor, Tensor]:
    """squared_norms [n] float32 (one per part, or one for all), loss and stop_flag 0-d ->
    (record [3] float64 = (loss, norm, stop_flag), clip scale 0-d float32, found_inf 0-d
    float32). ``max_norm <= 0``: no clipping (scale 1). Python floats, as megatron-core
    computes them (it reads the squared norm to the host); torch's CPU float64 ``sqrt`` is not
    always correctly rounded, Python's is."""
    roots = [value ** 0.5 for value in squared_norms.tolist()]     # get_grad_norm_fp32
    norm = math.sqrt(sum(r ** 2 for r in roots)) if separate_parts else roots[0]
    loss_value = float(loss)
    coefficient = max_norm / (norm + 1.0e-6) if max_norm > 0 else 1.0
    device = squared_norms.device
    record = torch.tensor([loss_value, norm, float(stop_flag)], dtype=torch.float64, device=device)
    # clip_grad_by_total_norm_fp32 scales (by the float as a float32) only below 1
    scale = torch.tensor(coefficient if coefficient < 1.0 else 1.0, dtype=torch.float32,
                         device=device)
    finite = math.isfinite(loss_value) and math.isfinite(norm)
    return record, scale, torch.tensor(0.0 if finite else 1.0, device=device)
