"""Residual block around a TransMamba / Mamba-2 mixer: x + mixer(RMSNorm(x))."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_tensor_model_parallel_group_if_none
from torch import Tensor

from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.layers.norm import RMSNorm
from megatron_transmamba.layers.transmamba_mixer import TransMambaMixer


class TransMambaLayer(MegatronModule):
    """Pre-norm residual mixer layer. ``layer_number`` is the global 1-based index (megatron)."""

    def __init__(self, config: TransMambaConfig, layer_number: int,
                 tp_group: Optional[torch.distributed.ProcessGroup] = None):
        super().__init__(config)
        self.layer_number = layer_number
        self.tp_group = get_tensor_model_parallel_group_if_none(tp_group)  # sharded_state_dict
        self.transpoint = config.transpoint_of_layer(layer_number - 1)
        self.norm = RMSNorm(config, config.hidden_size, eps=config.layernorm_epsilon)
        self.mixer = TransMambaMixer(config, self.transpoint, layer_number, tp_group=self.tp_group)

    def forward(self, hidden_states: Tensor, attention_mask=None, rotary_pos_emb=None,
                packed_seq_params=None, **unused) -> tuple[Tensor, None]:
        out, _ = self.mixer(self.norm(hidden_states), rotary_pos_emb=rotary_pos_emb,
                            packed_seq_params=packed_seq_params)
        return hidden_states + out, None
