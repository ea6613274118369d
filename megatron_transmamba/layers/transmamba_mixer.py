"""The TransMamba mixer: one layer whose projections serve both attention and Mamba-2.

arXiv 2503.24067 section 2 / DESIGN section 1: ``in_proj`` gives z, x, B, C, dt (Mamba-2
order); a causal depthwise conv + SiLU runs over x, B, C; then Q = C, K = B, V = x feed
softmax attention for tokens before the layer's TransPoint and the SSM (started from the Memory
Converter's exact state) for tokens after it; a grouped RMSNorm (gated by SiLU(z) on SSM tokens
only) and the shared ``out_proj`` finish the layer. With TransPoint 0 it is a Mamba-2 mixer.

Tensor parallel layout (megatron-core's Mamba layout): each rank owns H/tp heads and G/tp
groups; its in_proj rows are ``[z_r | x_r | B_r | C_r | dt_r]`` (column-parallel), conv
channels, A_log, D, dt_bias and norm weight follow its heads, out_proj is row-parallel. The
parameters are drawn at full size and cut to this rank's components, so the initial model is
the same whatever the TP size; ``sharded_state_dict`` stores every component separately.

Context parallel (``cp_group`` of R > 1 ranks, rank r holding global tokens [r S, (r + 1) S)):
the conv takes the previous shard's last W-1 input rows (``context_parallel_conv``); the SSD
scans the whole shard from the state passed between ranks (``context_parallel_ssd``), which at
the TransPoint p is the Memory Converter's state, and only its rows at global t >= p are used;
the rows t < p take attention over the keys of every earlier shard
(``context_parallel_prefix_attention``, RoPE at global positions); the gated norm gets the local
TransPoint clamp(p - r S, 0, S). Parameter gradients are this rank's partial sums (reduced over
CP like data parallelism), input gradients the full-sequence ones of this shard. Packed
documents under CP (``PackedDocuments.shard``: documents cross shards, positions count inside
the whole document): the halo counts only inside the receiving token's document, the state
passing resets at document starts and enters only a document that continues from the previous
shard, tokens at in-document positions j < p attend over their document's positions <= j,
gathered from earlier shards where they live (``context_parallel_document_attention``, RoPE at
in-document positions), the others take the SSM, and the norm gates by in-document position.

Decoding (mamba_ssm's ``Mamba2`` API, at TP = CP = 1): ``allocate_inference_cache`` makes the
layer's ``MixerCache``; ``forward(..., inference_cache=cache)`` is the prefill, one pass over the
prompt that leaves the conv state and the prefix's keys / values / dt or the SSM state; ``step``
takes one token. Both run ``transmamba_kernels.reference.mixer`` (the torch backend's math, the
exported Hugging Face model's too) around this layer's in_proj and out_proj.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import (ensure_metadata_has_dp_cp_group,
                                             make_sharded_tensors_for_checkpoint)
from megatron.core.utils import get_pg_rank, get_pg_size, get_tensor_model_parallel_group_if_none
from torch import Tensor

from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.layers.mixer_core import BACKENDS
from megatron_transmamba.layers.packed_documents import PackedDocuments
from megatron_transmamba.layers.rotary import apply_rope, apply_rope_at
from megatron_transmamba.parallel.context_parallel_attention import context_parallel_prefix_attention
from megatron_transmamba.parallel.context_parallel_conv import context_parallel_causal_conv1d_silu
from megatron_transmamba.parallel.context_parallel_documents import (
    context_parallel_document_attention)
from megatron_transmamba.parallel.context_parallel_ssd import SCANS, context_parallel_ssd
from megatron_transmamba.parallel.tensor_parallel import local_components, split_sharded_tensor
from transmamba_kernels.reference.cache import MixerCache
from transmamba_kernels.reference.mixer import (MixerShape, MixerWeights, allocate_mixer_cache,
                                                mixer_forward, mixer_step, processed_dt)
from transmamba_kernels.reference.norm import gated_rmsnorm_naive

IN_PROJ_COMPONENTS = ("z", "x", "B", "C", "dt")
CONV_COMPONENTS = ("x", "B", "C")


def _mark_tensor_parallel(param: nn.Parameter) -> None:
    tensor_parallel.set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)


def _gated_rmsnorm_triton(*args, **kwargs) -> Tensor:
    from transmamba_kernels.norm.gated_rmsnorm import gated_rmsnorm_triton

    return gated_rmsnorm_triton(*args, **kwargs)


# mixer_backend -> the gated norm that gates by each token's ``position_ids`` (packed documents
# under CP, whose positions continue across shards)
POSITION_NORMS = {"torch": gated_rmsnorm_naive, "triton": _gated_rmsnorm_triton}


def _initialized_later(weight: Tensor) -> None:
    """in_proj's init_method: ``reset_parameters`` fills it, component by component."""


class _BackwardAfter(torch.autograd.Function):
    """Identity on ``tensor``; ``later`` gets an empty gradient from it, so the backward of
    ``later``'s producers waits until every consumer of the returned tensor has run its own.
    Under CP the SSD's and the attention's all-gathers lie on independent branches, whose
    backward order autograd would otherwise pick from each rank's graph (ranks with no prefix
    rows have another); collectives must run in the same order on every rank."""

    @staticmethod
    def forward(ctx, tensor: Tensor, later: Tensor) -> Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class TransMambaMixer(MegatronModule):
    """TransMamba token mixer for input [S, B, d] (megatron layout); returns (out, bias)."""

    def __init__(self, config: TransMambaConfig, transpoint: int, layer_number: int = 1,
                 tp_group: Optional[torch.distributed.ProcessGroup] = None,
                 cp_group: Optional[torch.distributed.ProcessGroup] = None):
        super().__init__(config)
        self.config = config
        self.transpoint = int(transpoint)          # global: the same on every CP rank
        self.layer_number = layer_number
        self.tp_group = get_tensor_model_parallel_group_if_none(tp_group)
        self.tp_size, self.tp_rank = get_pg_size(self.tp_group), get_pg_rank(self.tp_group)
        self.cp_group = cp_group
        self.cp_size, self.cp_rank = get_pg_size(cp_group), get_pg_rank(cp_group)
        H, P, G, N = (config.mamba_num_heads, config.mamba_head_dim, config.mamba_num_groups,
                      config.mamba_state_dim)
        for name, value in (("mamba_num_heads", H), ("mamba_num_groups", G)):
            if value % self.tp_size:
                raise ValueError(f"model.{name}={value} must be divisible by the tensor-parallel "
                                 f"size {self.tp_size} (parallel.tensor_model_parallel_size)")
        self.heads, self.groups = H // self.tp_size, G // self.tp_size      # local to this rank
        self.head_dim, self.state_dim = P, N
        self.inner = self.heads * P                                   # local H*P
        self.conv_channels = self.inner + 2 * self.groups * N
        self.softmax_scale = 1.0 / math.sqrt(N)
        self.conv_silu, self.core, self.gated_norm = BACKENDS[config.mixer_backend]
        self.cp_scan = SCANS[config.mixer_backend]
        self.position_norm = POSITION_NORMS[config.mixer_backend]
        self.recompute_core = (config.recompute_granularity == "selective"
                               and "core_attn" in config.recompute_modules)
        # Full (TP = 1) sizes of the components of in_proj's rows and of the conv channels.
        self.in_proj_sections = (H * P, H * P, G * N, G * N, H)
        self.conv_sections = (H * P, G * N, G * N)

        self.in_proj = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, sum(self.in_proj_sections), config=config,
            init_method=_initialized_later, bias=False, gather_output=False,
            tp_group=self.tp_group)
        self.conv1d = nn.utils.skip_init(
            nn.Conv1d, self.conv_channels, self.conv_channels, config.mamba_conv_kernel,
            groups=self.conv_channels, padding=config.mamba_conv_kernel - 1, bias=True,
            dtype=config.params_dtype)
        self.dt_bias = nn.Parameter(torch.empty(self.heads, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.empty(self.heads, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(self.heads, dtype=torch.float32))
        self.norm_weight = nn.Parameter(torch.empty(self.inner, dtype=config.params_dtype))
        for param in (self.conv1d.weight, self.conv1d.bias, self.dt_bias, self.A_log, self.D,
                      self.norm_weight):
            _mark_tensor_parallel(param)
        self.out_proj = tensor_parallel.RowParallelLinear(
            H * P, config.hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=False, input_is_parallel=True, skip_bias_add=True, tp_group=self.tp_group)
        if config.perform_initialization:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba-2 initialisation of in_proj, conv1d, dt_bias, A_log, D and the norm weight.

        Each is drawn at full (TP = 1) size from the default RNG, which every rank seeds alike,
        and cut to this rank's components: the model starts the same at every TP size.
        """
        cfg, H = self.config, self.config.mamba_num_heads
        local = partial(local_components, rank=self.tp_rank, size=self.tp_size)
        in_proj = torch.empty(sum(self.in_proj_sections), cfg.hidden_size)
        cfg.init_method(in_proj)
        self.in_proj.weight.copy_(local(in_proj, self.in_proj_sections))
        # nn.Conv1d's default init: uniform(+-1/sqrt(fan_in)), fan_in = kernel width (depthwise).
        bound = 1.0 / math.sqrt(cfg.mamba_conv_kernel)
        channels = sum(self.conv_sections)
        conv_weight = torch.empty(channels, 1, cfg.mamba_conv_kernel).uniform_(-bound, bound)
        conv_bias = torch.empty(channels).uniform_(-bound, bound)
        self.conv1d.weight.copy_(local(conv_weight, self.conv_sections))
        self.conv1d.bias.copy_(local(conv_bias, self.conv_sections))
        dt = torch.exp(torch.rand(H) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                       + math.log(cfg.dt_min)).clamp(min=cfg.dt_init_floor)
        self.dt_bias.copy_(local(dt + torch.log(-torch.expm1(-dt)), [H]))   # inverse softplus
        self.A_log.copy_(local(torch.log(torch.empty(H).uniform_(*cfg.A_init_range)), [H]))
        self.D.fill_(1.0)
        self.norm_weight.fill_(1.0)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None) -> dict:
        """dist_checkpointing view: every parameter sharded by head / group over the TP group;
        in_proj.weight stored as z, x, B, C, dt and conv1d as x, B, C (each a whole tensor in
        the checkpoint, so it loads at any TP size that divides H and G)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        groups = dict(tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)          # dt_bias, A_log, D, norm_weight
        sharded = make_sharded_tensors_for_checkpoint(own, prefix, {name: 0 for name in own},
                                                      sharded_offsets, **groups)
        sharded.update(make_sharded_tensors_for_checkpoint(
            self.conv1d.state_dict(keep_vars=True), f"{prefix}conv1d.", {"weight": 0, "bias": 0},
            sharded_offsets, **groups))
        for name in ("in_proj", "out_proj"):
            sharded.update(getattr(self, name).sharded_state_dict(f"{prefix}{name}.",
                                                                   sharded_offsets, metadata))
        key = f"{prefix}in_proj.weight"
        sharded[key] = split_sharded_tensor(
            sharded[key], [s // self.tp_size for s in self.in_proj_sections], IN_PROJ_COMPONENTS)
        for name in ("weight", "bias"):
            key = f"{prefix}conv1d.{name}"
            sharded[key] = split_sharded_tensor(
                sharded[key], [s // self.tp_size for s in self.conv_sections], CONV_COMPONENTS)
        return sharded

    def _core_forward(self, projected: Tensor, rotary_pos_emb: Optional[Tensor],
                      documents: Optional[PackedDocuments] = None) -> Tensor:
        """[B, S, local in_proj width] -> the gated-norm output [B, S, local H*P]: conv + SiLU,
        attention / Memory Converter / SSM, gated RMSNorm (what selective recomputation redoes).
        With ``documents`` none of them crosses a document boundary."""
        seq_len = projected.shape[1]
        z, xBC, dt = torch.split(projected, [self.inner, self.conv_channels, self.heads], dim=-1)
        seq_idx = documents.seq_idx if documents is not None else None
        xBC = self.conv_silu(xBC, self.conv1d.weight, self.conv1d.bias, seq_idx)  # [B, S, channels]
        x, B, C = torch.split(xBC, [self.inner, self.groups * self.state_dim,
                                    self.groups * self.state_dim], dim=-1)
        batch = x.shape[0]
        x = x.reshape(batch, seq_len, self.heads, self.head_dim)             # views of the conv
        B = B.reshape(batch, seq_len, self.groups, self.state_dim)           # output: the
        C = C.reshape(batch, seq_len, self.groups, self.state_dim)           # kernels read them
        rope = None
        if rotary_pos_emb is not None and self.config.mixer_position_embedding == "rope":
            rope = rotary_pos_emb
        y, y_prefix = self.core(x, dt, self.dt_bias, self.A_log, B, C, self.D, self.transpoint,
                                self.config.ssd_chunk_size, self.softmax_scale, rope,
                                tuple(self.config.dt_limit), documents)      # [B, S, H, P]
        y = self.gated_norm(y.reshape(batch, seq_len, self.inner), z, self.norm_weight,
                            self.groups, self.config.layernorm_epsilon, self.transpoint,
                            documents, y_prefix=y_prefix)
        return y

    def _core_forward_cp(self, projected: Tensor, rotary_pos_emb: Optional[Tensor],
                         documents: Optional[PackedDocuments] = None) -> Tensor:
        """``_core_forward`` of this rank's CP shard [B, S, local width] -> [B, S, local H*P].
        Every rank issues the same collectives in the same order, forward (halo, SSD summaries,
        attention keys) and backward (attention, SSD, halo), whether or not its shard has
        prefix or SSM rows: which ones run depends only on the global p (and, with packed
        ``documents``, the whole micro-batch's documents)."""
        if documents is not None:
            return self._core_forward_cp_packed(projected, rotary_pos_emb, documents)
        batch, shard = projected.shape[:2]
        total = self.cp_size * shard
        p = max(0, min(self.transpoint, total))
        local_p = max(0, min(p - self.cp_rank * shard, shard))     # this shard's prefix rows
        z, xBC, dt = torch.split(projected, [self.inner, self.conv_channels, self.heads], dim=-1)
        xBC = context_parallel_causal_conv1d_silu(xBC, self.conv1d.weight, self.conv1d.bias,
                                                  self.cp_group, conv=self.conv_silu)
        x, B, C = torch.split(xBC, [self.inner, self.groups * self.state_dim,
                                    self.groups * self.state_dim], dim=-1)
        x = x.reshape(batch, shard, self.heads, self.head_dim)
        B = B.reshape(batch, shard, self.groups, self.state_dim)
        C = C.reshape(batch, shard, self.groups, self.state_dim)
        y = y_prefix = None
        if p < total:       # some rank has SSM rows, and they need every earlier shard's state
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            dt, A = processed_dt(dt, self.dt_bias, self.A_log, tuple(self.config.dt_limit), acc)
            y = context_parallel_ssd(x, dt, A, B, C, self.config.ssd_chunk_size, D=self.D.to(acc),
                                     cp_group=self.cp_group, scan=self.cp_scan,
                                     transpoint=local_p).to(x.dtype)          # [B, S, H, P]
        if p > 0:
            rope = None
            if rotary_pos_emb is not None and self.config.mixer_position_embedding == "rope":
                rope = rotary_pos_emb                                    # global positions
            values = x if y is None else _BackwardAfter.apply(x, y)
            y_prefix = context_parallel_prefix_attention(
                values, B, C, p, self.softmax_scale, rope, self.cp_group)  # [B, local_p, H, P]
            y_prefix = y_prefix.reshape(batch, local_p, self.groups,
                                        self.inner // self.groups)     # the norm's layout
        if y is None:                           # p = T: the norm reads every row from y_prefix
            y = x.new_empty(x.shape)
        elif y_prefix is not None and local_p == 0:
            # no prefix rows here, but the empty attention output stays on the graph: its
            # all-gather's backward is collective
            y, y_prefix = _BackwardAfter.apply(y, y_prefix), None
        return self.gated_norm(y.reshape(batch, shard, self.inner), z, self.norm_weight,
                               self.groups, self.config.layernorm_epsilon, local_p, None,
                               y_prefix=y_prefix)

    def _core_forward_cp_packed(self, projected: Tensor, rotary_pos_emb: Optional[Tensor],
                                documents: PackedDocuments) -> Tensor:
        """``_core_forward_cp`` with packed documents (``documents``: this rank's shard)."""
        batch, shard = projected.shape[:2]
        p = max(0, self.transpoint)
        positions = documents.position_ids                          # [B, S] in-document
        z, xBC, dt = torch.split(projected, [self.inner, self.conv_channels, self.heads], dim=-1)
        xBC = context_parallel_causal_conv1d_silu(xBC, self.conv1d.weight, self.conv1d.bias,
                                                  self.cp_group, conv=self.conv_silu,
                                                  seq_idx=documents.seq_idx,
                                                  position_ids=positions)
        x, B, C = torch.split(xBC, [self.inner, self.groups * self.state_dim,
                                    self.groups * self.state_dim], dim=-1)
        x = x.reshape(batch, shard, self.heads, self.head_dim)
        B = B.reshape(batch, shard, self.groups, self.state_dim)
        C = C.reshape(batch, shard, self.groups, self.state_dim)
        y = None
        # as without documents, whatever their lengths: the parameters that get a gradient do
        # not depend on the data (overlapped gradient reduction waits for each of them)
        if p < self.cp_size * shard:
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            dt, A = processed_dt(dt, self.dt_bias, self.A_log, tuple(self.config.dt_limit), acc)
            # the Triton scan counts its TransPoint from each document's first local token
            y = context_parallel_ssd(x, dt, A, B, C, self.config.ssd_chunk_size, D=self.D.to(acc),
                                     cp_group=self.cp_group, scan=self.cp_scan,
                                     transpoint=max(0, p - documents.max_offset),
                                     seq_idx=documents.seq_idx,
                                     position_ids=positions).to(x.dtype)   # [B, S, H, P]
        if p > 0:
            q, k = C, B
            if rotary_pos_emb is not None and self.config.mixer_position_embedding == "rope":
                q, k = (apply_rope_at(t, rotary_pos_emb, positions) for t in (C, B))
            values = x if y is None else _BackwardAfter.apply(x, y)
            values = values.reshape(batch, shard, self.groups, self.inner // self.groups)
            attention = context_parallel_document_attention(
                q, k, values, documents, self.softmax_scale, self.cp_group, limit=p)
            attention = attention.reshape(batch, shard, self.heads, self.head_dim)
            y = attention if y is None else torch.where((positions < p)[..., None, None],
                                                        attention, y)
        return self.position_norm(y.reshape(batch, shard, self.inner), z, self.norm_weight,
                                  self.groups, self.config.layernorm_epsilon, p,
                                  position_ids=positions)

    def decode_shape(self) -> MixerShape:
        """This mixer's sizes and settings for the reference decoding functions."""
        cfg = self.config
        return MixerShape(self.heads, self.head_dim, self.groups, self.state_dim,
                          cfg.mamba_conv_kernel, cfg.ssd_chunk_size, self.transpoint,
                          cfg.layernorm_epsilon, tuple(cfg.dt_limit),
                          cfg.rope_theta if cfg.mixer_position_embedding == "rope" else None)

    def _decode_weights(self) -> MixerWeights:
        return MixerWeights(self.conv1d.weight, self.conv1d.bias, self.dt_bias, self.A_log,
                            self.D, self.norm_weight)

    def _check_decoding(self) -> None:
        if self.tp_size != 1 or self.cp_size != 1:
            raise NotImplementedError(
                f"decoding runs at tensor- and context-parallel size 1 (this mixer has TP = "
                f"{self.tp_size}, CP = {self.cp_size}); a checkpoint of any layout loads at 1")

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int,
                                 dtype: Optional[torch.dtype] = None) -> MixerCache:
        """An empty decoding cache (mamba_ssm's ``Mamba2.allocate_inference_cache``): zero conv
        and SSM states (float32, float64 for a float64 model) and prefix buffers for
        min(p, max_seqlen) tokens (``transmamba_kernels.reference.cache.MixerCache``)."""
        self._check_decoding()
        weight = self.in_proj.weight
        return allocate_mixer_cache(self.decode_shape(), batch_size, max_seqlen,
                                    dtype or weight.dtype, weight.device)

    def step(self, hidden_states: Tensor, cache: MixerCache) -> Tensor:
        """One token: hidden_states [1, B, d] at position ``cache.length`` -> [1, B, d]
        (``reference.mixer.mixer_step``: attention over the cached prefix before the
        TransPoint, the Memory Converter after its last token, one SSM step from it on)."""
        projected, _ = self.in_proj(hidden_states)                    # [1, B, width]
        y = mixer_step(projected[0], self.decode_shape(), self._decode_weights(), cache)
        out, _ = self.out_proj(y[None])                               # [1, B, d]
        return out

    def _prefill(self, hidden_states: Tensor, rotary_pos_emb: Optional[Tensor],
                 cache: MixerCache) -> Tensor:
        """``forward`` of a whole prompt into an empty cache, in one pass (the reference core,
        whatever the backend: the torch backend's forward exactly)."""
        self._check_decoding()
        rotary = None
        if rotary_pos_emb is not None and self.config.mixer_position_embedding == "rope":
            rotary = partial(apply_rope, table=rotary_pos_emb)        # its cached cos / sin
        projected, _ = self.in_proj(hidden_states)                    # [S, B, width]
        y = mixer_forward(projected.transpose(0, 1), self.decode_shape(),
                          self._decode_weights(), cache, rotary)      # [B, S, H*P]
        out, _ = self.out_proj(y.transpose(0, 1))
        return out

    def forward(self, hidden_states: Tensor, rotary_pos_emb: Optional[Tensor] = None,
                packed_seq_params: Optional[PackedDocuments] = None,
                inference_cache: Optional[MixerCache] = None,
                **unused) -> tuple[Tensor, None]:
        """hidden_states: [S, B, d]; rotary_pos_emb: [S_max, 1, 1, N] (megatron RotaryEmbedding);
        packed_seq_params: the documents of the [B, S] micro-batch (whole S: under sequence
        parallelism in_proj has gathered the sequence before the core sees it). Under context
        parallelism S is this rank's shard, rotary_pos_emb the table of all R S positions and
        packed_seq_params this rank's ``PackedDocuments.shard``. ``inference_cache``: an empty
        ``allocate_inference_cache``, filled for ``step`` at position S (prefill; unpacked)."""
        if inference_cache is not None:
            if packed_seq_params is not None:
                raise NotImplementedError("prefill of packed documents is not supported")
            return self._prefill(hidden_states, rotary_pos_emb, inference_cache), None
        if packed_seq_params is not None and packed_seq_params.cp_size != self.cp_size:
            raise ValueError(f"packed documents of {packed_seq_params.cp_size} context-parallel "
                             f"shard(s) given to a mixer with {self.cp_size}: pass "
                             "PackedDocuments.shard(cp_rank, cp_size)")
        projected, _ = self.in_proj(hidden_states)                    # [S, B, local width]
        projected = projected.transpose(0, 1)                         # [B, S, ...]
        core_forward = self._core_forward if self.cp_size == 1 else self._core_forward_cp
        if packed_seq_params is not None:   # megatron's checkpoint saves only tensor arguments
            core_forward = partial(core_forward, documents=packed_seq_params)
        if self.recompute_core and torch.is_grad_enabled():
            # selective recomputation: keep in_proj's output, run the conv, the core and the
            # gated norm again in backward (megatron's checkpoint keeps the TP RNG tracker)
            y = tensor_parallel.checkpoint(core_forward, False, projected, rotary_pos_emb)
        else:
            y = core_forward(projected, rotary_pos_emb)
        out, _ = self.out_proj(y.transpose(0, 1))                     # [S, B, d]
        return out, None

