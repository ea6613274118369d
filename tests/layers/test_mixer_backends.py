"""Every mixer backend equals the ``torch`` reference backend, forward and backward."""

import pytest
import torch

from helpers import assert_close
from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.layers.rotary import rope_table
from megatron_transmamba.layers.transmamba_mixer import TransMambaMixer

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("megatron_single_process")


def make(backend):
    torch.manual_seed(0)
    cfg = TransMambaConfig(hidden_size=16, num_attention_heads=4, layer_pattern="T", seq_length=64,
                           transpoint_schedule="mamba", mamba_num_heads=4, mamba_head_dim=8,
                           mamba_num_groups=2, mamba_state_dim=16, ssd_chunk_size=16,
                           mixer_backend=backend, use_cpu_initialization=True)
    return TransMambaMixer(cfg, transpoint=0)


@pytest.mark.parametrize("T,p", [(37, 0), (37, 9), (37, 16), (37, 37), (5, 2)])
def test_triton_backend_equals_torch_backend(T, p):
    ref, fast = make("torch"), make("triton")
    fast.load_state_dict(ref.state_dict())
    hidden = torch.randn(T, 2, 16)
    table = rope_table(T, 16, 10000.0)
    outs, grads = [], []
    for mixer in (ref, fast):
        mixer.transpoint = p
        h = hidden.clone().requires_grad_(True)
        out, _ = mixer(h, rotary_pos_emb=table)
        out.pow(2).sum().backward()
        outs.append(out)
        grads.append([h.grad] + [q.grad for q in mixer.parameters()])
    assert_close("out", outs[0], outs[1], 1e-5)
    names = ["hidden"] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, grads[0], grads[1]):
        if a is None or a.abs().max() == 0:
            assert b is None or b.abs().max() == 0, name
            continue
        assert_close(f"d{name}", a, b, 1e-5)
