"""The TransMamba mixer core: attention on [0, p), the Memory Converter, SSD on [p, T).

DESIGN section 1, step 5 (arXiv 2503.24067 section 2): with Q = C, K = B, V = x from the
shared projection, tokens before the TransPoint p take causal softmax attention (one Q/K group
serves H/G value heads), the Memory Converter turns the prefix's K, V and dt into the SSM state
after token p-1, and the SSM continues from that state for tokens [p, T). The ``torch`` backend
here is the executable specification: ``transmamba_kernels.reference.mixer.transmamba_core``
(PyTorch SDPA for attention, the Memory Converter and the chunked SSD scan of the reference),
the same function decoding and the exported Hugging Face model run; faster backends must
match it. ``BACKENDS`` maps each
``mixer_backend`` to its conv, core and gated grouped RMSNorm (``transmamba_kernels``).

Packed documents (``PackedDocuments``): each document gets its own TransPoint min(p, length),
attention on its first tokens, the converter's state from those and the SSM for the rest, with
nothing crossing a document boundary. The torch backend runs the unpacked path once per
document (the reference); the triton backend runs the Triton SSD with ``seq_idx`` and a
per-document TransPoint, and the prefix attention as ``document_attention``.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_transmamba.layers.packed_documents import PackedDocuments, document_attention
from megatron_transmamba.layers.rotary import apply_rope
from transmamba_kernels.custom_op import custom_op
from transmamba_kernels.reference.attention import grouped_attention
from transmamba_kernels.reference.conv import causal_conv1d_silu_naive
from transmamba_kernels.reference.mixer import (RotaryFn, prefix_attention, processed_dt,
                                                transmamba_core)
from transmamba_kernels.reference.norm import gated_rmsnorm_naive

__all__ = ["BACKENDS", "grouped_attention", "prefix_attention", "transmamba_core_torch",
           "transmamba_core_triton", "fused_core", "mixer_core_torch", "mixer_core_triton"]

_processed_dt = processed_dt      # the name the mixer's context-parallel paths import


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
        y = _per_document(documents, lambda *parts: transmamba_core_torch(
            *parts[:5], D, transpoint, chunk_size, softmax_scale, rotary), x, dt, A, B, C)
        if documents.max_length <= transpoint < x.shape[1]:
            # No document reaches its SSM tokens in this micro-batch. A layer with SSM tokens
            # gives dt, A and D a gradient in every step (zero here), so the parameter set
            # that gets gradients does not depend on the data (megatron-core's overlapped
            # gradient reduction waits for every parameter).
            y = y + 0.0 * (dt.sum() + A.sum() + D.sum()).to(y.dtype)
        return y
    return transmamba_core(x, dt, A, B, C, D, transpoint, chunk_size, softmax_scale, rotary)


def transmamba_core_triton(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                           transpoint: int, chunk_size: int, softmax_scale: float,
                           rope: Optional[Tensor] = None,
                           documents: Optional[PackedDocuments] = None) -> Tensor:
    """``transmamba_core_torch`` on the Triton path, with dt already processed and A given:
    ``rope`` is the RoPE angle table (``rope_table``) instead of a function. The spliced
    [B, T, H, P] output (``fused_core`` returns the two segments apart, for the gated norm)."""
    if documents is not None:
        rotary = partial(apply_rope, table=rope) if rope is not None else None
        return _core_triton_packed(x, dt, A, B, C, D, transpoint, chunk_size, softmax_scale,
                                   rotary, documents)
    y, prefix = fused_core(x, dt, None, A, B, C, D, transpoint, chunk_size, softmax_scale, rope,
                           raw_dt=False)
    if prefix is None:
        return y
    prefix = prefix.transpose(1, 2).reshape(*x.shape[:1], prefix.shape[2], *x.shape[2:])
    return prefix if y is None else torch.cat([prefix, y[:, prefix.shape[1]:]], dim=1)


def fused_core(x: Tensor, dt: Tensor, dt_bias: Optional[Tensor], A: Tensor, B: Tensor, C: Tensor,
               D: Tensor, transpoint: int, chunk_size: int, softmax_scale: float,
               rope: Optional[Tensor] = None, dt_limit=(0.0, math.inf),
               raw_dt: bool = True) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The triton backend's core as two segments, for the gated norm to read in place.

    Args:
        x: [B, T, H, P]; B, C: [B, T, G, N]; any batch / token strides (views of the conv
            output are read in place).
        dt: [B, T, H]; with ``raw_dt`` it is in_proj's raw dt, and ``dt_bias`` [H], softplus,
            the ``dt_limit`` clamp and A = -exp(A) (A is then A_log) happen inside the SSD
            kernels; otherwise dt is processed and A is A.
        D: [H]. rope: RoPE angles [S >= p, 1, 1, N] or None.

    Returns:
        (y, attention): y [B, T, H, P] the SSD output with rows t < p zero (None at p >= T);
        attention [B, G, p, H/G * P], the prefix attention output as SDPA returns it (None at
        p = 0): ``attention.transpose(1, 2)`` is the gated norm's ``y_prefix``.

    At 0 < p < T both come from the custom op ``transmamba::core``: SSD forward, RoPE, SDPA.
    Its backward recomputes the prefix attention (RoPE and SDPA forward again, the only extra
    work), takes attention's gradients and hands them to the SSD backward, which adds them to
    rows t < p of dx, dB, dC inside its kernels: no slicing, zero-padding or summing of
    gradients.
    """
    from transmamba_kernels.ssd.chunk import _limits, ssd_fwd

    seq_len = x.shape[1]
    p = max(0, min(int(transpoint), seq_len))
    lo, hi = _limits(dt_limit)
    if p == seq_len:                       # attention only: dt, A and D are not used
        return None, _prefix_attention(x, B, C, p, softmax_scale, rope)
    if p == 0:
        y = ssd_fwd(x, dt, dt_bias, A, B, C, D, None, int(chunk_size), 0, raw_dt, raw_dt, lo,
                    hi)[0]
        return y, None
    y, attention, *_ = _core_op(x, dt, dt_bias, A, B, C, D, rope, p, int(chunk_size),
                                float(softmax_scale), raw_dt, lo, hi)
    return y, attention


def _prefix_attention(x: Tensor, B: Tensor, C: Tensor, p: int, softmax_scale: float,
                      rope: Optional[Tensor]) -> Tensor:
    """Causal attention of tokens [0, p): Q = C, K = B rotated by the fused RoPE kernel,
    V = x with each group's H/G value heads as one wide value. [B, G, p, H/G * P]."""
    from transmamba_kernels.rope.rope_qk import rope_qk_triton

    batch, _, heads, head_dim = x.shape
    groups = B.shape[2]
    q, k = C[:, :p], B[:, :p]
    if rope is not None:
        q, k = rope_qk_triton(q, k, rope)
    v = x[:, :p].reshape(batch, p, groups, (heads // groups) * head_dim)   # a view
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True, scale=softmax_scale)


def _core_body(x: Tensor, dt: Tensor, dt_bias: Optional[Tensor], A: Tensor, B: Tensor, C: Tensor,
             D: Tensor, rope: Optional[Tensor], transpoint: int, chunk_size: int,
             softmax_scale: float, raw_dt: bool, dt_limit_min: float,
             dt_limit_max: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, attention, SSD states, final state, chunk decay) at 0 < transpoint < T."""
    from transmamba_kernels.ssd.chunk import ssd_fwd

    y, final, states, decay = ssd_fwd(x, dt, dt_bias, A, B, C, D, None, chunk_size, transpoint,
                                      raw_dt, raw_dt, dt_limit_min, dt_limit_max)
    attention = _prefix_attention(x, B, C, transpoint, softmax_scale, rope)
    return y, attention, states, final, decay


_core_op = custom_op("transmamba::core")(_core_body)
_core_op.register_fake(_core_body)     # the same code on fake tensors gives the shapes


@custom_op("transmamba::core_backward")
def _core_backward_op(dy: Tensor, dattention: Tensor, x: Tensor, dt: Tensor,
                      dt_bias: Optional[Tensor], A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                      rope: Optional[Tensor], states: Tensor, final: Tensor, decay: Tensor,
                      transpoint: int, chunk_size: int, softmax_scale: float, raw_dt: bool,
                      dt_limit_min: float, dt_limit_max: float
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, ddt, d dt_bias, dA, dB, dC, dD); d dt_bias is empty without dt_bias."""
    p = transpoint
    with _autograd_enabled():
        prefix = [t[:, :p].detach().requires_grad_(True) for t in (x, B, C)]
        attention = _prefix_attention(prefix[0], prefix[1], prefix[2], p, softmax_scale, rope)
        dx_prefix, dB_prefix, dC_prefix = torch.autograd.grad(attention, prefix, dattention)
    from transmamba_kernels.ssd.chunk import ssd_bwd

    dx, ddt, dbias, dA, dB, dC, dD, _ = ssd_bwd(
        dy, None, x, dt, dt_bias, A, B, C, D, None, states, final, decay, chunk_size, p, raw_dt,
        raw_dt, dt_limit_min, dt_limit_max, dx_prefix, dB_prefix, dC_prefix)
    return dx, ddt, dbias, dA, dB, dC, dD


_AUTOGRAD_KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                  torch._C.DispatchKey.AutogradNestedTensor)


@contextlib.contextmanager
def _autograd_enabled():
    """Autograd inside a custom op's body: torch runs the body below autograd (its dispatch
    keys excluded), which ``torch.enable_grad`` alone does not undo. Every other excluded key
    stays excluded (autocast's); called outside the op (eager), it only enables grad."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), \
            torch.enable_grad():
        yield


@_core_backward_op.register_fake
def _(dy, dattention, x, dt, dt_bias, A, B, C, D, *args):
    like = lambda t: t.new_empty(t.shape)
    return (like(x), like(dt), like(dt_bias) if dt_bias is not None else x.new_empty(0), like(A),
            like(B), like(C), like(D))


def _core_setup(ctx, inputs, output):
    x, dt, dt_bias, A, B, C, D, rope, *scalars = inputs
    _, _, states, final, decay = output
    ctx.save_for_backward(x, dt, dt_bias, A, B, C, D, rope, states, final, decay)
    ctx.scalars = scalars
    ctx.mark_non_differentiable(states, final, decay)
    ctx.set_materialize_grads(False)


def _core_backward(ctx, dy, dattention, *_):
    x, dt, dt_bias, A, B, C, D, rope, states, final, decay = ctx.saved_tensors
    transpoint, chunk_size, softmax_scale, raw_dt, lo, hi = ctx.scalars
    if dy is None:
        dy = torch.zeros_like(x)
    if dattention is None:
        dattention = x.new_zeros(x.shape[0], B.shape[2], transpoint,
                                 x.shape[2] // B.shape[2] * x.shape[3])
    dx, ddt, dbias, dA, dB, dC, dD = _core_backward_op(
        dy, dattention, x, dt, dt_bias, A, B, C, D, rope, states, final, decay, transpoint,
        chunk_size, softmax_scale, raw_dt, lo, hi)
    return (dx, ddt, dbias if dt_bias is not None else None, dA, dB, dC, dD,
            None, None, None, None, None, None, None)


_core_op.register_autograd(_core_backward, setup_context=_core_setup)


def _core_triton_packed(x, dt, A, B, C, D, transpoint, chunk_size, softmax_scale, rotary,
                        documents: PackedDocuments) -> Tensor:
    """Packed documents: one SSD call with ``seq_idx`` (state reset and TransPoint per
    document), one ``document_attention`` over every document's first p tokens, spliced by
    each token's position in its document."""
    from transmamba_kernels.ssd.chunk import chunk_ssd_triton

    p = max(0, int(transpoint))
    y = None
    if p < x.shape[1]:     # also when no document is longer than p: every step, the same
        y = chunk_ssd_triton(x, dt, A, B, C, chunk_size, D=D, seq_idx=documents.seq_idx,
                             transpoint=p)     # parameters get gradients (zero ones here)
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
                        transpoint: int, documents: Optional[PackedDocuments] = None,
                        y_prefix: Optional[Tensor] = None) -> Tensor:
    """``gated_rmsnorm_naive``; with documents, each one alone (gate from its own p on).
    ``y_prefix`` [B, p, G, C/G] replaces rows t < p of y (the fused kernel's signature)."""
    if y_prefix is not None:
        prefix = y_prefix.reshape(*y_prefix.shape[:2], -1)
        y = torch.cat([prefix, y[:, prefix.shape[1]:]], dim=1)
    if documents is None:
        return gated_rmsnorm_naive(y, z, weight, groups, eps, transpoint)
    return _per_document(documents, lambda y_d, z_d: gated_rmsnorm_naive(
        y_d, z_d, weight, groups, eps, transpoint), y, z)


def gated_rmsnorm_triton(y: Tensor, z: Tensor, weight: Tensor, groups: int, eps: float,
                         transpoint: int, documents: Optional[PackedDocuments] = None,
                         y_prefix: Optional[Tensor] = None) -> Tensor:
    from transmamba_kernels.norm.gated_rmsnorm import gated_rmsnorm_triton as fused

    # packed documents: the kernel gates by each token's position in its document
    position_ids = documents.position_ids if documents is not None else None
    return fused(y, z, weight, groups, eps, transpoint, position_ids=position_ids,
                 y_prefix=y_prefix)


def causal_conv1d_silu_triton(x: Tensor, weight: Tensor, bias: Tensor,
                              seq_idx: Optional[Tensor] = None) -> Tensor:
    from transmamba_kernels.conv.causal_conv import causal_conv1d_silu_triton as fused
    return fused(x, weight, bias, seq_idx)


def mixer_core_torch(x: Tensor, dt: Tensor, dt_bias: Tensor, A_log: Tensor, B: Tensor,
                     C: Tensor, D: Tensor, transpoint: int, chunk_size: int,
                     softmax_scale: float, rope: Optional[Tensor] = None,
                     dt_limit=(0.0, math.inf), documents: Optional[PackedDocuments] = None
                     ) -> tuple[Tensor, None]:
    """The mixer's core from in_proj's raw dt and the parameters (the reference backend):
    x [B, T, H, P], dt [B, T, H] raw, dt_bias / A_log / D [H], B, C [B, T, G, N], rope the
    RoPE angle table or None. Returns (y [B, T, H, P], None) in float32 (float64 for a float64
    model) math; the second item is the triton backend's separate prefix (none here)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dt, A = processed_dt(dt, dt_bias, A_log, dt_limit, acc)
    rotary = partial(apply_rope, table=rope) if rope is not None else None
    return transmamba_core_torch(x, dt, A, B, C, D.to(acc), transpoint, chunk_size,
                                 softmax_scale, rotary, documents), None


def mixer_core_triton(x: Tensor, dt: Tensor, dt_bias: Tensor, A_log: Tensor, B: Tensor,
                      C: Tensor, D: Tensor, transpoint: int, chunk_size: int,
                      softmax_scale: float, rope: Optional[Tensor] = None,
                      dt_limit=(0.0, math.inf), documents: Optional[PackedDocuments] = None
                      ) -> tuple[Tensor, Optional[Tensor]]:
    """``mixer_core_torch`` on the Triton path: (y [B, T, H, P], y_prefix [B, p, G, H/G * P]
    or None) for the gated norm, which reads rows t < p from y_prefix (``fused_core``; rows
    of y before p are never read). Packed documents take the spliced path (one tensor)."""
    if documents is not None:
        acc = torch.float32
        dt, A = processed_dt(dt, dt_bias, A_log, dt_limit, acc)
        return transmamba_core_triton(x, dt, A, B, C, D.to(acc), transpoint, chunk_size,
                                      softmax_scale, rope, documents), None
    y, attention = fused_core(x, dt, dt_bias, A_log, B, C, D, transpoint, chunk_size,
                              softmax_scale, rope, dt_limit)
    if y is None:                          # p >= T: the norm reads every row from the prefix
        y = x.new_empty(x.shape)
    return y, attention.transpose(1, 2) if attention is not None else None


# backend -> (causal conv + SiLU, core, gated grouped RMSNorm); every entry has the signature
# of its torch counterpart
BACKENDS = {
    "torch": (causal_conv1d_silu_naive, mixer_core_torch, gated_rmsnorm_torch),
    "triton": (causal_conv1d_silu_triton, mixer_core_triton, gated_rmsnorm_triton),
}
