"""Layer specs: the one place that says what each layer symbol is built from.

``T`` / ``M``: our TransMamba residual block. ``*``: megatron-core ``TransformerLayer`` with
``SelfAttention`` (column-parallel QKV, SDPA core attention, row-parallel output projection;
``SelfAttentionFusedRope``: RoPE in one fused kernel under the triton backend). ``-``:
megatron-core ``TransformerLayer`` with a SwiGLU ``MLP`` (``FusedSwiGLU``: the gate in one
kernel). Norms are our sequence-parallel-aware ``RMSNorm``. When the model carries the fused
residual stream (``residual_stream``: triton backend, no bias, no hidden dropout,
layers/norm.py), ``*`` and ``-`` are ``ResidualStreamTransformerLayer``: megatron-core's layer,
same submodules and parameter names, that also takes the stream.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_transmamba.layers.attention import SDPAttention, SelfAttentionFusedRope
from megatron_transmamba.layers.mlp import FusedSwiGLU
from megatron_transmamba.layers.norm import RMSNorm
from megatron_transmamba.layers.transmamba_layer import (ResidualStreamTransformerLayer,
                                                        TransMambaLayer)


def attention_layer_spec(residual_stream: bool = False) -> ModuleSpec:
    return ModuleSpec(
        module=ResidualStreamTransformerLayer if residual_stream else TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttentionFusedRope,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPAttention,
                    linear_proj=RowParallelLinear,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
        ),
    )


def mlp_layer_spec(fused_swiglu: bool = False, residual_stream: bool = False) -> ModuleSpec:
    return ModuleSpec(
        module=ResidualStreamTransformerLayer if residual_stream else TransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear,
                activation_func=FusedSwiGLU if fused_swiglu else None)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def layer_specs(*, fused_swiglu: bool = False,
                residual_stream: bool = False) -> dict[str, ModuleSpec]:
    """Spec of each layer-pattern symbol (``fused_swiglu``: the config's
    ``use_te_activation_func``, see layers/mlp.py; ``residual_stream``: ``*`` and ``-`` take the
    fused residual stream, layers/norm.py ``residual_stream_applies``). TransMambaLayer takes
    both forms."""
    mixer = ModuleSpec(module=TransMambaLayer)
    return {"T": mixer, "M": mixer,
            "*": attention_layer_spec(residual_stream),
            "-": mlp_layer_spec(fused_swiglu, residual_stream)}
