"""The optimizer step's scalars: the Triton kernel (interpreted) against the PyTorch reference,
bitwise, and the reference against megatron-core's host arithmetic in Python floats."""

import math

import pytest
import torch

from transmamba_kernels.optimizer.naive import step_scalars_naive
from transmamba_kernels.optimizer.step_scalars import step_scalars_triton

CASES = [([4.0], 2.5, 0.05, False), ([4.0, 9.0], 2.5, 1.0, True), ([0.3, 7.1, 2e-9], 1.5, 1.0, True),
         ([123.456], 3.0, 1.0, False), ([1e-3], 1.0, 1.0, False), ([4.0], 1.0, 0.0, False),
         ([float("inf")], 1.0, 1.0, False), ([1e-3], float("nan"), 1.0, False),
         ([float("nan"), 1.0], 1.0, 1.0, True), ([2.0], float("-inf"), 1.0, False)]


def same(a, b):
    return a.isnan().equal(b.isnan()) and torch.equal(a.nan_to_num(0.0, 1e300, -1e300),
                                                      b.nan_to_num(0.0, 1e300, -1e300))


@pytest.mark.parametrize("squared, loss, max_norm, separate", CASES)
def test_kernel_equals_reference(squared, loss, max_norm, separate):
    args = (torch.tensor(squared), torch.tensor(loss), torch.tensor(1.0), max_norm, separate)
    for out, ref in zip(step_scalars_triton(*args), step_scalars_naive(*args)):
        assert out.dtype == ref.dtype and out.shape == ref.shape and same(out, ref), (out, ref)


@pytest.mark.parametrize("squared, loss, max_norm, separate", CASES[:6])
def test_reference_is_megatrons_host_arithmetic(squared, loss, max_norm, separate):
    """Written out here from megatron-core 0.16's get_grad_norm_fp32, ChainedOptimizer.get_grad_norm
    and clip_grad_by_total_norm_fp32."""
    record, scale, found_inf = step_scalars_naive(torch.tensor(squared), torch.tensor(loss),
                                                  torch.tensor(0.0), max_norm, separate)
    roots = [float(torch.tensor(s)) ** (1.0 / 2.0) for s in squared]
    norm = math.sqrt(sum(r ** 2 for r in roots)) if separate else roots[0]
    assert record.tolist() == [loss, norm, 0.0] and found_inf.item() == 0.0
    if max_norm > 0 and max_norm / (norm + 1.0e-6) < 1.0:
        scaled = torch.ones(3) * (max_norm / (norm + 1.0e-6))     # multi_tensor_scale's multiply
        assert torch.equal(torch.ones(3) * scale, scaled)
    else:
        assert scale.item() == 1.0
