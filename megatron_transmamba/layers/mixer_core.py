"""The TransMamba mixer core: attention on [0, p), the Memory Converter, SSD on [p, T).

DESIGN section 1, step 5 (arXiv 2503.24067 section 2): with Q = C, K = B, V = x from the
shared projection, tokens before the TransPoint p take causal softmax attention (one Q/K group
serves H/G value heads), the Memory Converter turns the prefix's K, V and dt into the SSM state
after token p-1, and the SSM continues from that state for tokens [p, T). The ``torch`` backend
here is the executable specification: PyTorch SDPA for attention and the chunked SSD scan of
``transmamba_kernels.ssd.naive``; faster backends must match it. ``BACKENDS`` maps each
``mixer_backend`` to its conv, core and gated grouped RMSNorm (``transmamba_kernels``).

Packed documents (``PackedDocuments``): each document gets its own TransPoint min(p, length),
attention on its first tokens, the converter's state from those and the SSM for the rest, with
nothing crossing a document boundary. The torch backend runs the unpacked path once per
document (the reference); the triton backend runs the Triton SSD with ``seq_idx`` and a
per-document TransPoint, and the prefix attention as ``document_attention``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_transmamba.layers.memory_converter import memory_converter
from megatron_transmamba.layers.packed_documents import PackedDocuments, document_attention
from transmamba_kernels.conv.naive import causal_conv1d_silu_naive
from transmamba_kernels.norm.naive import gated_rmsnorm_naive
from transmamba_kernels.ssd.naive import chunk_ssd_naive

RotaryFn = Callable[[Tensor], Tensor]


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float) -> Tensor:
    """Causal softmax attention where each Q/K group serves H/G value heads.

    Args:
        q, k: [B, p, G, N]; v: [B, p, H, P].

    Returns:
        [B, p, H, P].
    """
    batch, p, heads, head_dim = v.shape
    groups = q.shape[2]
    # The softmax matrix is shared by the group, so the group's value heads are one wide value.
    v_grouped = v.reshape(batch, p, groups, (heads // groups) * head_dim)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v_grouped.transpose(1, 2),
        is_causal=True, scale=softmax_scale)                                     # [B, G, p, H/G*P]
    return out.transpose(1, 2).reshape(batch, p, heads, head_dim)


def prefix_attention(x: Tensor, B: Tensor, C: Tensor, p: int, softmax_scale: float,
                     rotary: Optional[RotaryFn]) -> Tensor:
    """Attention segment: Q = C, K = B (rotated when RoPE is on), V = x over tokens [0, p)."""
    q, k = C[:, :p], B[:, :p]
    if rotary is not None:
        q, k = rotary(q), rotary(k)
    return grouped_attention(q, k, x[:, :p], softmax_scale)


def transmamba_core_torch(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                          transpoint: int, chunk_size: int, softmax_scale: float,
                          rotary: Optional[RotaryFn] = None,
                          documents: Optional[PackedDocuments] = None) -> Tensor:
    """Mixer core output before the gated norm.

    Args:
        x: [B, T, H, P] (= V); dt: [B, T, H] after softplus and clamping; A: [H] negative;
        B: [B, T, G, N] (= K); C: [B, T, G, N] (= Q); D: [H] skip.
        transpoint: p in [0, T] (larger values are clamped to T).
        rotary: applies RoPE to a [B, p, G, N] tensor at positions 0..p-1 (attention only).
        documents: packed documents of the [B, T] rows; each runs alone, from position 0.

    Returns:
        y: [B, T, H, P] in x's dtype: attention output for t < p, SSM output (with the D skip,
        without the z gate) for t >= p (t and p counted inside each document).
    """
    if documents is not None:
        return _per_document(documents, lambda *parts: transmamba_core_torch(
            *parts[:5], D, transpoint, chunk_size, softmax_scale, rotary), x, dt, A, B, C)
    seq_len = x.shape[1]
    p = max(0, min(int(transpoint), seq_len))
    parts = []
    initial_state = None
    if p > 0:
        parts.append(prefix_attention(x, B, C, p, softmax_scale, rotary))
        if p < seq_len:
            initial_state = memory_converter(B[:, :p], x[:, :p], dt[:, :p], A)
    if p < seq_len:
        y_ssm = chunk_ssd_naive(x[:, p:], dt[:, p:], A, B[:, p:], C[:, p:], chunk_size, D=D,
                                initial_states=initial_state)
        parts.append(y_ssm.to(x.dtype))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def transmamba_core_triton(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                           transpoint: int, chunk_size: int, softmax_scale: float,
                           rotary: Optional[RotaryFn] = None,
                           documents: Optional[PackedDocuments] = None) -> Tensor:
    """Same as ``transmamba_core_torch``; the SSM runs in the Triton SSD over the whole sequence
    with outputs only from p on, so the Memory Converter is fused into its state passing, and
    the attention rows are written into the SSD's output buffer (``_SplicedCore``)."""
    from transmamba_kernels.ssd.chunk import chunk_ssd_triton

    if documents is not None:
        return _core_triton_packed(x, dt, A, B, C, D, transpoint, chunk_size, softmax_scale,
                                   rotary, documents)
    seq_len = x.shape[1]
    p = max(0, min(int(transpoint), seq_len))
    if p == 0:
        return chunk_ssd_triton(x, dt, A, B, C, chunk_size, D=D)
    if p == seq_len:
        return _attention(x, B, C, softmax_scale, rotary)
    inputs = (x, dt, A, B, C, D)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _SplicedCore.apply(*inputs, p, chunk_size, softmax_scale, rotary)
    y = chunk_ssd_triton(x, dt, A, B, C, chunk_size, D=D, transpoint=p)
    y[:, :p] = _attention(x[:, :p], B[:, :p], C[:, :p], softmax_scale, rotary)
    return y


def _attention(x: Tensor, B: Tensor, C: Tensor, softmax_scale: float,
               rotary: Optional[RotaryFn]) -> Tensor:
    """``prefix_attention`` on tensors already cut to the prefix: [B, p, ...] -> [B, p, H, P]."""
    q, k = (C, B) if rotary is None else (rotary(C), rotary(B))
    return grouped_attention(q, k, x, softmax_scale)


class _SplicedCore(torch.autograd.Function):
    """The core at 0 < p < T without whole-tensor copies (TransPoint-aware, like the SSD).

    Forward: the Triton SSD writes [B, T, H, P] with rows [0, p) zero, and the attention output
    is copied into those rows (p rows, where ``torch.cat`` copied T). Backward: the SSD gets the
    whole output gradient (it never reads rows before p: they are constant zeros), attention
    gets a view of rows [0, p), and attention's x, B, C gradients are added into the prefix rows
    of the SSD's (where slicing would zero-pad each to T rows and sum two T-row tensors). Both
    segments keep their own autograd graphs, built in forward on detached inputs and run by
    ``torch.autograd.grad`` in backward; ``rotary`` must not need gradients (RoPE tables do not).
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, p, chunk_size, softmax_scale, rotary):
        from transmamba_kernels.ssd.chunk import chunk_ssd_triton

        needs = ctx.needs_input_grad
        with torch.enable_grad():
            ssd_in = [t.detach().requires_grad_(need) for t, need in zip((x, dt, A, B, C, D), needs)]
            y = chunk_ssd_triton(*ssd_in[:5], chunk_size, D=ssd_in[5], transpoint=p)
            prefix_in = [t[:, :p].detach().requires_grad_(need)
                         for t, need in ((x, needs[0]), (B, needs[3]), (C, needs[4]))]
            attention = _attention(*prefix_in, softmax_scale, rotary)
        out = y.detach()                                      # the same buffer
        out[:, :p] = attention.detach()
        ctx.p, ctx.graphs = p, (y, ssd_in, attention, prefix_in)
        return out

    @staticmethod
    def backward(ctx, dout):
        y, ssd_in, attention, prefix_in = ctx.graphs
        del ctx.graphs                                        # free both graphs after use
        grads = _grad(y, ssd_in, dout)
        prefix_grads = _grad(attention, prefix_in, dout[:, :ctx.p].to(attention.dtype))
        for full, prefix in zip((grads[0], grads[3], grads[4]), prefix_grads):
            if prefix is not None:
                full[:, :ctx.p] += prefix
        return (*grads, None, None, None, None)


def _grad(output: Tensor, inputs: list, grad_output: Tensor) -> list:
    """torch.autograd.grad for the inputs that require it (None for the others)."""
    wanted = [t for t in inputs if t.requires_grad]
    found = iter(torch.autograd.grad(output, wanted, grad_output) if wanted else ())
    return [next(found) if t.requires_grad else None for t in inputs]


def _core_triton_packed(x, dt, A, B, C, D, transpoint, chunk_size, softmax_scale, rotary,
                        documents: PackedDocuments) -> Tensor:
    """Packed documents: one SSD call with ``seq_idx`` (state reset and TransPoint per
    document), one ``document_attention`` over every document's first p tokens, spliced by
    each token's position in its document."""
    from transmamba_kernels.ssd.chunk import chunk_ssd_triton

    p = max(0, int(transpoint))
    y = None
    if documents.max_length > p:
        y = chunk_ssd_triton(x, dt, A, B, C, chunk_size, D=D, seq_idx=documents.seq_idx,
                             transpoint=p)
    if p == 0:
        return y

    def attend(q, k, v):
        if rotary is not None:
            q, k = rotary(q), rotary(k)
        return grouped_attention(q, k, v, softmax_scale)

    attention = document_attention(C, B, x, documents, attend, limit=p)
    if y is None:
        return attention
    in_prefix = (documents.position_ids < p)[:, :, None, None]
    return torch.where(in_prefix, attention, y)


def _per_document(documents: PackedDocuments, fn, *tensors: Tensor) -> Tensor:
    """Run ``fn`` on each document alone ([1, length, ...] slices of the [B, T, ...] tensors;
    tensors with fewer than two dims are passed whole) and put the outputs back in place."""
    rows = [[] for _ in range(documents.batch)]
    for row, start, end in documents.spans:
        parts = [t[row:row + 1, start:end] if t.dim() >= 2 else t for t in tensors]
        rows[row].append(fn(*parts))
    return torch.cat([torch.cat(parts, dim=1) for parts in rows], dim=0)


def gated_rmsnorm_torch(y: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float,
                        transpoint: int, documents: Optional[PackedDocuments] = None) -> Tensor:
    """``gated_rmsnorm_naive``; with documents, each one alone (gate from its own p on)."""
    if documents is None:
        return gated_rmsnorm_naive(y, z, weight, groups, eps, transpoint)
    return _per_document(documents, lambda y_d, z_d: gated_rmsnorm_naive(
        y_d, z_d, weight, groups, eps, transpoint), y, z)


def gated_rmsnorm_triton(y: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float,
                         transpoint: int, documents: Optional[PackedDocuments] = None) -> Tensor:
    from transmamba_kernels.norm.gated_rmsnorm import gated_rmsnorm_triton as fused

    # packed documents: the kernel gates by each token's position in its document
    position_ids = documents.position_ids if documents is not None else None
    return fused(y, z, weight, groups, eps, transpoint, position_ids=position_ids)


def causal_conv1d_silu_triton(x: Tensor, weight: Tensor, bias: Tensor,
                              seq_idx: Optional[Tensor] = None) -> Tensor:
    from transmamba_kernels.conv.causal_conv import causal_conv1d_silu_triton as fused
    return fused(x, weight, bias, seq_idx)


# backend -> (causal conv + SiLU, core, gated grouped RMSNorm); every entry has the signature
# of its torch counterpart
BACKENDS = {
    "torch": (causal_conv1d_silu_naive, transmamba_core_torch, gated_rmsnorm_torch),
    "triton": (causal_conv1d_silu_triton, transmamba_core_triton, gated_rmsnorm_triton),
}
