"""The training step's optimizer update (training/optimizer_step.py) runs megatron-core's step
in parts, with the norm, clip and NaN/inf skip on the device: the same updates and norms as
``optimizer.step()`` to the bit, no update (weights, moments, step counters) on a NaN
gradient or loss, and no host read of a device value."""

import math
from types import SimpleNamespace

import pytest
import torch
from megatron.core.distributed import finalize_model_grads

from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.models.language_model import TransMambaLanguageModel
from megatron_transmamba.training.launch_counter import LaunchCounter
from megatron_transmamba.training.optimizer_step import StepRecords, device_step, optimizer_step
from megatron_transmamba.training.pretrain import build_optimizer, wrap_model_chunks

pytestmark = pytest.mark.usefixtures("megatron_single_process")


def train(use_distributed_optimizer, step_fn, steps=3, nan_at=None):
    cfg = TransMambaConfig(hidden_size=32, num_attention_heads=4, layer_pattern="T-M-", seq_length=16,
                           mamba_num_heads=4, mamba_head_dim=8, mamba_num_groups=2, mamba_state_dim=8,
                           ssd_chunk_size=8, ffn_hidden_size=64, use_cpu_initialization=True)
    model = TransMambaLanguageModel(cfg, vocab_size=64, init_seed=7)
    ddp = wrap_model_chunks([model], cfg, bf16=False, use_distributed_optimizer=use_distributed_optimizer)
    t = SimpleNamespace(lr=1e-2, min_lr=1e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                        adam_eps=1e-8, clip_grad=0.05, lr_warmup_iters=1, train_iters=10,
                        lr_decay_style="cosine")
    optimizer, scheduler = build_optimizer(ddp, t, bf16=False, params_dtype=torch.float32,
                                           use_distributed_optimizer=use_distributed_optimizer)
    g = torch.Generator().manual_seed(0)
    norms = []
    for step in range(steps):
        ddp[0].zero_grad_buffer()
        optimizer.zero_grad()
        ids = torch.randint(0, 64, (2, 16), generator=g)
        ddp[0](ids, labels=ids).mean().backward()
        finalize_model_grads(ddp)
        if step == nan_at:
            next(p for p in model.parameters()).main_grad.view(-1)[0] = float("nan")
        applied, norm = step_fn(optimizer)
        norms.append((applied, norm))
        if applied:
            scheduler.step(1)
    return [p.detach().clone() for p in model.parameters()], norms, optimizer


def megatron_step(optimizer):
    applied, norm, _ = optimizer.step()
    return applied, float(norm)


@pytest.mark.parametrize("distributed", [False, True])
def test_same_updates_and_norms_as_megatron_step(distributed):
    ours, our_norms, _ = train(distributed, optimizer_step)
    ref, ref_norms, _ = train(distributed, megatron_step)
    assert our_norms == ref_norms and all(applied for applied, _ in our_norms)
    assert our_norms[0][1] > 0.05                  # clipping was active
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def adam_state(optimizer):
    inner = optimizer.optimizer
    return [{k: v.clone() for k, v in inner.state[p].items()} for g in inner.param_groups
            for p in g["params"]]


def test_nan_gradient_skips_the_update():
    before, _, reference = train(False, optimizer_step, steps=1)
    after, norms, skipped = train(False, optimizer_step, steps=2, nan_at=1)
    assert norms[1][0] is False and math.isnan(norms[1][1])
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    for a, b in zip(adam_state(reference), adam_state(skipped)):     # moments and step counters
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_skips_the_update_and_nothing_is_read_on_the_host():
    """The loop's step reads nothing from the device (a NaN loss skips on the device alone);
    its record says what happened when the host reads it."""
    state = {}

    def loop_step(optimizer):
        loss = torch.tensor(float("nan")) if "records" in state else torch.tensor(2.0)
        stop = torch.zeros(())
        with LaunchCounter() as counter:
            record = device_step(optimizer, loss, stop, torch.device("cpu"), use_triton=True)
            records = StepRecords(torch.device("cpu"))
            records.push(1, record)
        assert sum(counter.counts.host_syncs.values()) == 0, counter.counts.sync_ops
        state["records"] = records
        loss, norm, _ = records.pop()[1]
        return math.isfinite(loss) and math.isfinite(norm), norm

    before, _, _ = train(False, optimizer_step, steps=1)
    after, norms, _ = train(False, loop_step, steps=2)
    assert norms[0][0] and not norms[1][0] and math.isfinite(norms[1][1])
    for a, b in zip(before, after):
        assert torch.equal(a, b)
