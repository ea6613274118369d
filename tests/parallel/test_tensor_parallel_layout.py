"""Single-process checks of the tensor-parallel layout helpers (no process group needed)."""

import pytest
import torch

from megatron_transmamba.parallel.tensor_parallel import local_components
from megatron_transmamba.training.pretrain import pad_vocab_size


def test_local_components_take_each_components_chunk():
    # rows [z0 z1 z2 z3 | x0 x1 x2 x3 | dt0 dt1]: rank 1 of 2 keeps [z2 z3 | x2 x3 | dt1]
    full = torch.arange(10).unsqueeze(1).expand(10, 3)
    out = local_components(full, [4, 4, 2], rank=1, size=2)
    assert out[:, 0].tolist() == [2, 3, 6, 7, 9]
    assert out.shape == (5, 3)
    # the ranks' parts, put back component by component, are the full tensor
    parts = [local_components(full, [4, 4, 2], rank=r, size=2) for r in range(2)]
    back = torch.cat([torch.cat([p[s] for p in parts]) for s in (slice(0, 2), slice(2, 4), slice(4, 5))])
    assert torch.equal(back, full)


def test_local_components_refuse_uneven_components():
    with pytest.raises(ValueError, match="component of size 3 does not split over 2"):
        local_components(torch.zeros(7), [4, 3], rank=0, size=2)
    with pytest.raises(ValueError, match=r"component sizes \[4, 4\] do not cover"):
        local_components(torch.zeros(7), [4, 4], rank=0, size=2)


def test_padded_vocab_does_not_depend_on_the_tp_size():
    assert {pad_vocab_size(257, 64, tp) for tp in (1, 2, 4, 8)} == {320}
    assert pad_vocab_size(257, 64, 3) == 384               # lcm(64, 3) = 192
