"""The foreach stand-ins for megatron-core's multi-tensor fallbacks give megatron's values."""

import torch

from megatron.core import utils
from megatron_transmamba import megatron_adapter
from megatron_transmamba.training.multi_tensor import foreach_l2_norm, foreach_scale


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for shape in ((7, 3), (11,), (2, 5, 4), (1,))]


def test_l2_norm_equals_norm_of_all_elements():
    ts = tensors()
    norm, per_tensor = foreach_l2_norm(2048 * 32, None, [ts], False)
    flat = torch.cat([t.flatten() for t in ts]).double()
    assert norm.shape == (1,) and norm.dtype == torch.float32 and per_tensor is None
    assert abs(norm.item() - flat.norm().item()) <= 1e-6 * flat.norm().item()


def test_scale_in_place_copy_and_cast_equal_the_local_fallback():
    for make_dst in (lambda s: s, lambda s: [t.clone() * 0 for t in s],
                     lambda s: [torch.zeros_like(t, dtype=torch.bfloat16) for t in s]):
        for scale in (1.0, 0.37):
            ours_src, ref_src = tensors(1), tensors(1)
            ours_dst, ref_dst = make_dst(ours_src), make_dst(ref_src)
            foreach_scale(0, None, [ours_src, ours_dst], scale)
            utils.local_multi_tensor_scale(0, None, [ref_src, ref_dst], scale)
            for a, b in zip(ours_dst, ref_dst):
                assert a.dtype == b.dtype and torch.equal(a, b)


def test_the_adapter_points_megatron_core_at_them():
    from megatron.core.optimizer import clip_grads, optimizer

    megatron_adapter.apply()
    assert clip_grads.l2_norm_impl is foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is foreach_scale
    assert optimizer.multi_tensor_scale_impl is foreach_scale
