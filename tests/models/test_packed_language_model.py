"""Packed documents through the whole language model (T, *, M and - layers, RoPE on): a
micro-batch whose rows hold several documents gives, in float64, the per-token losses and the
parameter gradients of running every document alone."""

import pytest
import torch

from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.models.language_model import TransMambaLanguageModel

pytestmark = pytest.mark.usefixtures("megatron_single_process")

# TransPoints 7 and 20 (list schedule over the two T layers): documents shorter than
# and longer than each. Row 1 is a single document.
ROWS = [[5, 13, 1, 9], [28]]
SEQ, VOCAB = 28, 64
SMALL = dict(hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
             mamba_num_heads=4, mamba_num_groups=2, mamba_head_dim=8, mamba_state_dim=8,
             seq_length=SEQ, ssd_chunk_size=16, use_cpu_initialization=True,
             params_dtype=torch.float64, layer_pattern="T-*-M-T-",
             transpoint_schedule="list", transpoint_values=[7, 20])


def build(**kw):
    torch.manual_seed(0)
    return TransMambaLanguageModel(TransMambaConfig(**{**SMALL, **kw}), VOCAB).double()


def cu_seqlens():
    return torch.tensor([0] + [n for row in ROWS for n in row]).cumsum(0)


def loss_and_grads(model, tokens, labels, weights, **kw):
    model.zero_grad()
    loss = model(tokens, labels=labels, **kw)                      # [B, S]
    (loss * weights).sum().backward()
    # None: the SSM parameters of a layer whose TransPoint covers the whole input
    return loss.detach(), {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                           for n, p in model.named_parameters()}


def test_packed_rows_equal_documents_alone_float64():
    model = build()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    weights = torch.rand(2, SEQ, generator=g, dtype=torch.float64)
    loss, grads = loss_and_grads(model, tokens, labels, weights, cu_seqlens=cu_seqlens())

    want_loss = torch.zeros_like(loss)
    want_grads = {name: torch.zeros_like(g) for name, g in grads.items()}
    for row, lengths in enumerate(ROWS):
        start = 0
        for n in lengths:
            sl = slice(start, start + n)
            doc_loss, doc_grads = loss_and_grads(model, tokens[row:row + 1, sl],
                                                 labels[row:row + 1, sl], weights[row:row + 1, sl])
            want_loss[row, sl] = doc_loss[0]
            for name, value in doc_grads.items():
                want_grads[name] += value
            start += n
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-10)
    for name, value in want_grads.items():
        # A_log, D, dt_bias are float32 parameters: their gradients round to float32
        atol = 1e-10 if value.dtype == torch.float64 else 1e-6 * value.abs().max().item()
        torch.testing.assert_close(grads[name], value, rtol=0, atol=atol, msg=name)
    # and the documents matter
    assert (model(tokens, labels=labels) - loss).abs().max() > 1e-3


def test_one_document_per_row_is_the_unpacked_model():
    model = build()
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    one_per_row = torch.tensor([0, SEQ, 2 * SEQ])
    torch.testing.assert_close(model(tokens, cu_seqlens=one_per_row), model(tokens),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_recomputation_keeps_the_documents(recompute):
    plain = build()
    kw = {"recompute_granularity": "selective", "recompute_modules": ["core_attn", "mlp"]} \
        if recompute == "selective" else {}
    other = build(**kw)
    other.load_state_dict(plain.state_dict())
    other.recompute = recompute == "full"
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    labels = torch.roll(tokens, -1, 1)
    weights = torch.ones(2, SEQ, dtype=torch.float64)
    loss, grads = loss_and_grads(plain, tokens, labels, weights, cu_seqlens=cu_seqlens())
    other_loss, other_grads = loss_and_grads(other, tokens, labels, weights,
                                             cu_seqlens=cu_seqlens())
    assert torch.equal(loss, other_loss)
    for name, value in grads.items():
        assert torch.equal(other_grads[name], value), name


def test_pipeline_stages_given_the_same_documents_chain_to_the_whole_model():
    """Every pipeline stage gets the micro-batch's cu_seqlens (lm_forward_step on each stage)."""
    cfg = TransMambaConfig(**SMALL)
    whole = TransMambaLanguageModel(cfg, VOCAB, init_seed=5).double()
    first = TransMambaLanguageModel(cfg, VOCAB, layer_range=range(0, 3), post_process=False,
                                    init_seed=5).double()
    last = TransMambaLanguageModel(cfg, VOCAB, layer_range=range(3, 8), pre_process=False,
                                   init_seed=5).double()
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    labels = torch.roll(tokens, -1, 1)
    last.set_input_tensor(first(tokens, cu_seqlens=cu_seqlens()))
    torch.testing.assert_close(last(tokens, labels=labels, cu_seqlens=cu_seqlens()),
                               whole(tokens, labels=labels, cu_seqlens=cu_seqlens()),
                               rtol=0, atol=1e-12)
