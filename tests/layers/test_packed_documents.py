"""Packed documents through the mixer: a row d1|d2|d3 gives exactly what each document gives
alone (outputs, input and parameter gradients), for both backends, with TransPoints longer and
shorter than the documents; plus the document layout and ``document_attention`` itself."""

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.layers.packed_documents import PackedDocuments, document_attention
from megatron_transmamba.layers.rotary import rope_table
from megatron_transmamba.layers.transmamba_mixer import TransMambaMixer

pytestmark = pytest.mark.usefixtures("megatron_single_process")

# Row 0: three documents, one shorter than the TransPoint 7 (5 tokens), one longer and
# crossing a 16-token chunk (13), one short (3); row 1: a 2-token document and a 19-token one.
ROWS = [[5, 13, 3], [2, 19]]
SEQ = 21


def cu_seqlens(rows=ROWS, seq=SEQ):
    lengths = [n for row in rows for n in row]
    assert all(sum(row) == seq for row in rows)
    return torch.tensor([0] + lengths).cumsum(0)


def make_mixer(backend, dtype):
    torch.manual_seed(0)
    cfg = TransMambaConfig(hidden_size=16, num_attention_heads=4, layer_pattern="T", seq_length=64,
                           transpoint_schedule="mamba", mamba_num_heads=4, mamba_head_dim=8,
                           mamba_num_groups=2, mamba_state_dim=8, ssd_chunk_size=16,
                           mixer_backend=backend, params_dtype=dtype, use_cpu_initialization=True)
    mixer = TransMambaMixer(cfg, transpoint=0)
    with torch.no_grad():  # non-trivial norm weight, D and conv bias
        mixer.norm_weight.uniform_(0.5, 1.5)
        mixer.D.uniform_(-1, 1)
        mixer.conv1d.bias.uniform_(-0.5, 0.5)
    return mixer


def run(mixer, hidden, cotangent, documents=None):
    """Output and the gradients of (out * cotangent).sum() wrt the input and every parameter."""
    mixer.zero_grad()
    h = hidden.detach().clone().requires_grad_(True)
    table = rope_table(hidden.shape[0], 8, 10000.0).to(hidden.dtype)
    out, _ = mixer(h, rotary_pos_emb=table, packed_seq_params=documents)
    (out * cotangent).sum().backward()
    return out.detach(), h.grad, {n: p.grad.clone() for n, p in mixer.named_parameters()
                                  if p.grad is not None}


def alone(mixer, hidden, cotangent):
    """The same quantities with every document run on its own ([length, 1, d] inputs)."""
    out, dh = torch.zeros_like(hidden), torch.zeros_like(hidden)
    grads = {}
    for row, lengths in enumerate(ROWS):
        start = 0
        for n in lengths:
            sl = slice(start, start + n)
            o, g, pg = run(mixer, hidden[sl, row:row + 1], cotangent[sl, row:row + 1])
            out[sl, row:row + 1], dh[sl, row:row + 1] = o, g
            for name, value in pg.items():
                grads[name] = grads.get(name, 0) + value
            start += n
    return out, dh, grads


def check(mixer, transpoint, dtype, compare):
    mixer.transpoint = transpoint
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(SEQ, len(ROWS), 16, generator=g).to(dtype)
    cotangent = torch.randn(SEQ, len(ROWS), 16, generator=g).to(dtype)
    documents = PackedDocuments.from_cu_seqlens(cu_seqlens(), len(ROWS), SEQ)
    packed = run(mixer, hidden, cotangent, documents)
    ref = alone(mixer, hidden, cotangent)
    compare("out", ref[0], packed[0])
    compare("dhidden", ref[1], packed[1])
    assert ref[2].keys() == packed[2].keys()
    for name in ref[2]:
        compare(f"d{name}", ref[2][name], packed[2][name])
    # the documents matter: the unpacked row differs
    unpacked, _ = mixer(hidden, rotary_pos_emb=rope_table(SEQ, 8, 10000.0).to(dtype))
    assert (unpacked.detach() - packed[0]).abs().max() > 1e-3


def exact(name, ref, out):
    """1e-10 in float64; dt_bias, A_log and D are float32 parameters (dt is computed in float32
    whatever the dtype), so their gradients agree to float32 rounding only."""
    atol = 1e-10 if ref.dtype == torch.float64 else 1e-6 * ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("transpoint", [0, 7, 64])
def test_torch_backend_packed_row_equals_documents_alone_float64(transpoint):
    check(make_mixer("torch", torch.float64), transpoint, torch.float64, exact)


@pytest.mark.parametrize("transpoint", [0, 7])
def test_triton_backend_packed_row_equals_documents_alone_float32(transpoint):
    pytest.importorskip("triton")
    check(make_mixer("triton", torch.float32), transpoint, torch.float32,
          lambda name, ref, out: assert_close(name, ref, out, 1e-5))


def test_one_document_per_row_is_the_unpacked_mixer():
    mixer = make_mixer("torch", torch.float64)
    mixer.transpoint = 9
    hidden = torch.randn(SEQ, 2, 16, dtype=torch.float64)
    documents = PackedDocuments.from_cu_seqlens(torch.tensor([0, SEQ, 2 * SEQ]), 2, SEQ)
    table = rope_table(SEQ, 8, 10000.0).double()
    torch.testing.assert_close(mixer(hidden, rotary_pos_emb=table, packed_seq_params=documents)[0],
                               mixer(hidden, rotary_pos_emb=table)[0], rtol=0, atol=1e-12)


def test_layout_from_cu_seqlens():
    # an empty document (repeated offset) is dropped; ids and positions restart per document
    docs = PackedDocuments.from_cu_seqlens(torch.tensor([0, 3, 3, 5, 9, 10]), 2, 5)
    assert docs.spans == ((0, 0, 3), (0, 3, 5), (1, 0, 4), (1, 4, 5))
    assert docs.seq_idx.tolist() == [[0, 0, 0, 1, 1], [2, 2, 2, 2, 3]]
    assert docs.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert docs.cu_seqlens.tolist() == [0, 3, 5, 9, 10]
    table = rope_table(5, 4, 10000.0)
    assert torch.equal(docs.rotary_table(table)[:, 1, 0], table[[0, 1, 2, 3, 0], 0, 0])
    with pytest.raises(ValueError, match="row start"):
        PackedDocuments.from_cu_seqlens(torch.tensor([0, 3, 7, 10]), 2, 5)
    with pytest.raises(ValueError, match="non-decreasing"):
        PackedDocuments.from_cu_seqlens(torch.tensor([0, 5, 4, 10]), 2, 5)


@pytest.mark.parametrize("limit", [None, 1, 4, 100])
def test_document_attention_equals_causal_attention_per_document(limit):
    """Padded length classes (1, 2, 3-4, 5-8, ... tokens) against SDPA on each document."""
    rows = [[1, 2, 4, 9, 5], [8, 13]]
    seq = 21
    docs = PackedDocuments.from_cu_seqlens(cu_seqlens(rows, seq), 2, seq)
    assert len(docs.buckets(limit)) == (5 if limit in (None, 100) else 1 if limit == 1 else 3)
    q, k = torch.randn(2, 2, seq, 4, 6, dtype=torch.float64).unbind(0)
    v = torch.randn(2, seq, 2, 5, dtype=torch.float64)

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), is_causal=True,
                                              enable_gqa=True).transpose(1, 2)

    out = document_attention(q, k, v, docs, attend, limit)
    want = torch.zeros(2, seq, 4, 5, dtype=torch.float64)
    for row, start, end in docs.spans:
        end = end if limit is None else min(end, start + limit)
        want[row:row + 1, start:end] = attend(q[row:row + 1, start:end],
                                              k[row:row + 1, start:end], v[row:row + 1, start:end])
    torch.testing.assert_close(out, want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("backend, dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_ssm_parameters_get_gradients_when_no_document_reaches_the_transpoint(backend, dtype):
    """Every document shorter than p < T: dt_bias, A_log and D still get (zero) gradients, so
    megatron-core's overlapped gradient reduction sees the same parameters in every step."""
    mixer = make_mixer(backend, dtype)
    mixer.transpoint = 10
    rows = [[5, 8, 8], [2, 9, 10]]
    documents = PackedDocuments.from_cu_seqlens(cu_seqlens(rows), len(rows), SEQ)
    hidden = torch.randn(SEQ, len(rows), 16, dtype=dtype)
    _, _, grads = run(mixer, hidden, torch.randn_like(hidden), documents)
    for name in ("dt_bias", "A_log", "D"):
        assert name in grads and torch.count_nonzero(grads[name]) == 0, name
