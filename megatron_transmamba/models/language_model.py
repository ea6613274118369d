"""The TransMamba decoder-only language model (DESIGN section 3).

embedding -> layers of the pattern (``T`` TransMamba, ``M`` Mamba-2, ``*`` attention, ``-``
MLP, each a pre-norm residual block) -> final RMSNorm -> LM head. Activations are megatron's
[S, B, d]. With labels, ``forward`` returns the per-token loss [B, S] from the vocab-parallel
cross entropy; without, the logits [B, S, V / tp].

Tensor / sequence parallelism (docs/parallelism.md): the model receives its process groups
(``pg_collection``) and hands the tensor-parallel group to every module. Under sequence
parallelism the embedding scatters [S/tp, B, d] along the sequence, the norms and residuals
stay sharded, the parallel linears gather before and reduce-scatter after each mixer,
attention and MLP, and the LM head gathers the sequence back: logits are [S, B, V/tp].
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.utils import sharded_state_dict_default
from megatron.core.utils import get_pg_size
from torch import Tensor, nn

from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.layers.norm import RMSNorm
from megatron_transmamba.layers.rotary import rope_table
from megatron_transmamba.models.specs import layer_specs
from megatron_transmamba.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_transmamba.parallel.initialize import model_process_groups


class TransMambaLanguageModel(MegatronModule):
    """Decoder-only LM whose layers follow ``config.layer_pattern``."""

    def __init__(self, config: TransMambaConfig, vocab_size: int,
                 use_transformer_engine: bool = False, pg_collection=None):
        """``pg_collection``: megatron-core ``ProcessGroupCollection`` (tp, cp, pp at least);
        default: the groups of megatron's parallel state (``parallel.initialize``)."""
        super().__init__(config)
        self.config = config
        self.model_type = ModelType.encoder_or_decoder   # read by megatron-core's schedules
        self.vocab_size = vocab_size
        self.pg_collection = pg_collection if pg_collection is not None else model_process_groups()
        self.tp_group = tp_group = self.pg_collection.tp
        _check_tensor_parallel_group(config, vocab_size, get_pg_size(tp_group))
        self.embedding = LanguageModelEmbedding(config, vocab_size, config.seq_length,
                                                position_embedding_type="none", tp_group=tp_group)
        specs = layer_specs(use_transformer_engine)
        layers = []
        for index, symbol in enumerate(config.layer_pattern):
            if symbol in "TM":
                layers.append(build_module(specs[symbol], config, layer_number=index + 1,
                                           tp_group=tp_group))
            else:
                layers.append(build_module(specs[symbol], config=config, layer_number=index + 1,
                                           pg_collection=self.pg_collection))
        self.layers = nn.ModuleList(layers)
        self.final_norm = RMSNorm(config, config.hidden_size, eps=config.layernorm_epsilon)
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, vocab_size, config=config, init_method=config.init_method,
            bias=False, gather_output=False, skip_bias_add=False, tp_group=tp_group)
        self.attention_rope_dim = config.kv_channels if "*" in config.layer_pattern else None
        self.mixer_rope_dim = (config.mamba_state_dim if config.uses_mixer
                               and config.mixer_position_embedding == "rope" else None)

    def set_input_tensor(self, input_tensor) -> None:
        """megatron-core's schedules hand a pipeline stage its input activations here; with one
        stage it is None (pipeline stages: TODO(#5))."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        if input_tensor is not None:
            raise NotImplementedError("pipeline parallelism lands with issue #5")

    def forward(self, input_ids: Tensor, position_ids: Optional[Tensor] = None,
                labels: Optional[Tensor] = None) -> Tensor:
        """input_ids, labels: [B, S]. Returns loss [B, S] with labels, else logits [B, S, V/tp]."""
        seq_len = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=input_ids.device).unsqueeze(0)
        hidden = self.embedding(input_ids=input_ids, position_ids=position_ids)   # [S, B, d]
        # RoPE tables: '*' layers rotate their head dim, mixers their state dim N.
        attention_rope = mixer_rope = None
        if self.attention_rope_dim:
            attention_rope = rope_table(seq_len, self.attention_rope_dim, self.config.rope_theta, input_ids.device)
        if self.mixer_rope_dim:
            mixer_rope = rope_table(seq_len, self.mixer_rope_dim, self.config.rope_theta, input_ids.device)
        for symbol, layer in zip(self.config.layer_pattern, self.layers):
            rope = mixer_rope if symbol in "TM" else attention_rope
            hidden, _ = layer(hidden, attention_mask=None, rotary_pos_emb=rope)
        hidden = self.final_norm(hidden)                            # [S/tp, B, d] under SP
        logits, _ = self.output_layer(hidden)                       # [S, B, V/tp] (SP: gathered)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        loss = vocab_parallel_cross_entropy(logits.float(), labels.transpose(0, 1).contiguous(),
                                            self.tp_group)
        return loss.transpose(0, 1).contiguous()                    # [B, S]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None) -> dict:
        """dist_checkpointing view of the model. Layers are keyed by their global index
        (``layers.<layer_number - 1>``), so keys do not depend on the parallel layout."""
        metadata = dict(metadata or {})
        metadata.setdefault("dp_cp_group", self.pg_collection.dp_cp)
        sharded = {}
        for name, module in self.named_children():
            if name != "layers":
                sharded.update(sharded_state_dict_default(module, f"{prefix}{name}.",
                                                          sharded_offsets, metadata,
                                                          tp_group=self.tp_group))
                continue
            for index, layer in enumerate(module):
                local = f"{prefix}layers.{index}."
                layer_state = layer.sharded_state_dict(local, sharded_offsets, metadata)
                replace_prefix_for_sharding(layer_state, local,
                                            f"{prefix}layers.{layer.layer_number - 1}.")
                sharded.update(layer_state)
        return sharded


def _check_tensor_parallel_group(config: TransMambaConfig, vocab_size: int, tp_size: int) -> None:
    if tp_size != config.tensor_model_parallel_size:
        raise ValueError(f"the tensor-parallel process group has {tp_size} ranks but "
                         f"tensor_model_parallel_size={config.tensor_model_parallel_size}")
    if vocab_size % tp_size:
        raise ValueError(f"vocab_size={vocab_size} must be divisible by "
                         f"parallel.tensor_model_parallel_size={tp_size} (the embedding and LM "
                         "head split the vocabulary; pad it, see "
                         "training.make_vocab_size_divisible_by)")


def count_parameters(model: nn.Module, tp_size: int = 1) -> int:
    """Parameters of the whole model when ``model`` is one tensor-parallel rank's part: the
    tensor-parallel ones (split evenly) count tp_size times, the replicated ones once."""
    return sum(p.numel() * (tp_size if getattr(p, "tensor_model_parallel", False) else 1)
               for p in model.parameters())
