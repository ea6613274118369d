"""Pre-norm residual blocks: x + mixer(RMSNorm(x)) around a TransMamba / Mamba-2 mixer, and
megatron-core's ``TransformerLayer`` (``*`` attention, ``-`` MLP) able to run on the fused
residual stream (layers/norm.py).

Called with the plain hidden stream x, each returns (x + f(norm(x)), None), as megatron-core's
layers do. Called with ``residual=`` (a tensor, or None for a stack's first layer), x is
hidden + residual: the add and the norm run as one kernel (``RMSNorm.add_and_norm``) and the
layer returns (f(norm(x)), x), leaving the add to the next layer's norm or the final norm
(models/language_model.py). Parameters and checkpoint keys are the same either way.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import get_tensor_model_parallel_group_if_none
from torch import Tensor

from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.layers.norm import PLAIN, RMSNorm
from megatron_transmamba.layers.transmamba_mixer import TransMambaMixer
from transmamba_kernels.reference.cache import MixerCache


class TransMambaLayer(MegatronModule):
    """Pre-norm residual mixer layer. ``layer_number`` is the global 1-based index (megatron)."""

    def __init__(self, config: TransMambaConfig, layer_number: int,
                 tp_group: Optional[torch.distributed.ProcessGroup] = None,
                 cp_group: Optional[torch.distributed.ProcessGroup] = None):
        super().__init__(config)
        self.layer_number = layer_number
        self.tp_group = get_tensor_model_parallel_group_if_none(tp_group)  # sharded_state_dict
        self.transpoint = config.transpoint_of_layer(layer_number - 1)
        self.norm = RMSNorm(config, config.hidden_size, eps=config.layernorm_epsilon)
        self.mixer = TransMambaMixer(config, self.transpoint, layer_number, tp_group=self.tp_group,
                                     cp_group=cp_group)

    def forward(self, hidden_states: Tensor, attention_mask=None, rotary_pos_emb=None,
                packed_seq_params=None, residual=PLAIN, inference_cache: Optional[MixerCache] = None,
                **unused) -> tuple[Tensor, Optional[Tensor]]:
        """hidden_states [S, B, d] (S/tp under SP; S this rank's shard under context
        parallelism, with ``rotary_pos_emb`` the global table) -> (x + mixer(norm(x)), None),
        or with ``residual`` (module docstring) -> (mixer(norm(x)), x). ``inference_cache``:
        the mixer's prefill fills it (``TransMambaMixer.forward``)."""
        stream = residual is not PLAIN
        normed, summed = self.norm.add_and_norm(hidden_states, residual if stream else None)
        out, _ = self.mixer(normed, rotary_pos_emb=rotary_pos_emb,
                            packed_seq_params=packed_seq_params, inference_cache=inference_cache)
        return (out, summed) if stream else (summed + out, None)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int,
                                 dtype: Optional[torch.dtype] = None) -> MixerCache:
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype)

    def step(self, hidden_states: Tensor, cache: MixerCache) -> Tensor:
        """One token [1, B, d] -> x + mixer.step(norm(x)) [1, B, d]."""
        return hidden_states + self.mixer.step(self.norm(hidden_states), cache)


class ResidualStreamTransformerLayer(TransformerLayer):
    """megatron-core's ``TransformerLayer`` of one ``*`` (attention) or ``-`` (MLP) sublayer that
    also takes the residual stream (models/specs.py builds it when ``residual_stream_applies``:
    no bias, no hidden dropout). A plain call is megatron-core's forward, unchanged; with
    ``residual`` its pre-norm (``input_layernorm`` or ``pre_mlp_layernorm``) adds the residual
    and the attention or MLP runs on the result, with megatron's MLP recomputation
    (``recompute_modules: mlp``)."""

    def forward(self, hidden_states: Tensor, attention_mask=None, rotary_pos_emb=None,
                packed_seq_params=None, residual=PLAIN, **kwargs):
        if residual is PLAIN:
            return super().forward(hidden_states, attention_mask=attention_mask,
                                   rotary_pos_emb=rotary_pos_emb,
                                   packed_seq_params=packed_seq_params, **kwargs)
        if kwargs:
            raise TypeError(f"the residual stream takes no {sorted(kwargs)} (inference runs the "
                            "plain layer)")
        if not isinstance(self.self_attention, IdentityOp):
            normed, residual = self.input_layernorm.add_and_norm(hidden_states, residual)
            out, bias = self.self_attention(normed, attention_mask=attention_mask,
                                            rotary_pos_emb=rotary_pos_emb,
                                            packed_seq_params=packed_seq_params)
        else:
            normed, residual = self.pre_mlp_layernorm.add_and_norm(hidden_states, residual)
            if self.recompute_mlp:
                out, bias = tensor_parallel.checkpoint(self.mlp, False, normed)
            else:
                out, bias = self.mlp(normed)
        if bias is not None:
            raise ValueError("the residual stream needs bias-free layers (add_bias_linear=False)")
        return out, residual
