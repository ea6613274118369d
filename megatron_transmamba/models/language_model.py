"""The TransMamba decoder-only language model (DESIGN section 3).

embedding -> layers of the pattern (``T`` TransMamba, ``M`` Mamba-2, ``*`` attention, ``-``
MLP, each a pre-norm residual block) -> final RMSNorm -> LM head (optionally tied to the
embedding, ``share_embeddings_and_output_weights``). Activations are megatron's [S, B, d]. With labels, ``forward`` returns the per-token loss [B, S] from the vocab-parallel
cross entropy; without, the logits [B, S, V / tp].

Tensor / sequence parallelism (docs/parallelism.md): the model receives its process groups
(``pg_collection``) and hands the tensor-parallel group to every module. Under sequence
parallelism the embedding scatters [S/tp, B, d] along the sequence, the norms and residuals
stay sharded, the parallel linears gather before and reduce-scatter after each mixer,
attention and MLP, and the LM head gathers the sequence back: logits are [S, B, V/tp].

Residual stream (layers/norm.py): under the triton backend (no bias, no hidden dropout) the
layers pass (hidden, residual) with hidden + residual the residual stream, so each layer's add
and the next norm (the last layer's add and the final norm) are one ``add_rmsnorm`` kernel each
way. A pipeline stage hands on one tensor: its last step adds, the next stage starts with
residual None. The torch backend (the reference) adds in every layer.

Packed documents (``cu_seqlens``, docs/model.md): the [B, S] layout stays; every layer gets
the same ``PackedDocuments`` and keeps attention, conv and SSM state inside each document,
and RoPE positions restart at each document start. Under context parallelism the documents
are built for the whole [B, R S] micro-batch and every layer gets this rank's
``PackedDocuments.shard``: documents cross shards and keep counting their positions.

Decoding (one process): ``allocate_inference_cache`` (every layer's cache in a ``HybridCache``),
``prefill`` (each layer once over the prompt, the training forward's logits) and ``step`` (one
token per row); inference/generate.py samples with them.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.utils.checkpoint
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.utils import sharded_state_dict_default
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.utils import get_pg_rank, get_pg_size
from torch import Tensor, nn

from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.layers.norm import RMSNorm, residual_stream_applies
from megatron_transmamba.layers.packed_documents import PackedDocuments
from megatron_transmamba.layers.rotary import rope_table
from megatron_transmamba.megatron_adapter.language_module import LanguageModuleOnAnyDevice
from megatron_transmamba.models.specs import layer_specs
from megatron_transmamba.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_transmamba.parallel.initialize import model_process_groups
from transmamba_kernels.reference.cache import HybridCache


class TransMambaLanguageModel(LanguageModuleOnAnyDevice):
    """Decoder-only LM whose layers follow ``config.layer_pattern``. It is a megatron-core
    ``LanguageModule`` for the tied embedding and LM head (``shared_embedding_or_output_weight``,
    the embedding group, the tied checkpoint entry), which finalize_model_grads expects; the
    two methods it cannot take as they are live in ``megatron_adapter.language_module``."""

    def __init__(self, config: TransMambaConfig, vocab_size: int,
                 pg_collection=None,
                 layer_range: Optional[range] = None, pre_process: bool = True,
                 post_process: bool = True, init_seed: Optional[int] = None,
                 vp_stage: Optional[int] = None, recompute: bool = False):
        """``pg_collection``: megatron-core ``ProcessGroupCollection`` (tp, cp, pp at least);
        default: the groups of megatron's parallel state (``parallel.initialize``).

        A pipeline stage (``parallel/pipeline.py``) builds the layers of ``layer_range`` (global
        indices into the pattern, default all), the embedding if ``pre_process`` and the final
        norm and LM head if ``post_process``. With ``init_seed`` each part draws its initial
        weights from its own seed (the embedding ``init_seed``, layer i ``init_seed + 1 + i``,
        the head ``init_seed + 1 + num_layers``), so the initial model is the same for every
        pipeline split; without it the parts draw one after another from the global RNG.
        ``vp_stage``: this chunk's index on its rank under interleaved pipelining.
        ``recompute``: full activation recomputation; each layer keeps only its input and
        runs its forward again during backward (torch.utils.checkpoint). It restores torch's
        RNG but not megatron's tensor-parallel RNG tracker, so it refuses dropout.

        ``config.share_embeddings_and_output_weights``: the LM head multiplies by the embedding
        matrix. A last stage without the embedding holds a copy, started equal to it (drawn from
        the embedding's seed, then copied over the embedding group) and marked ``shared``: the
        optimizer leaves it out of the gradient norm, finalize_model_grads all-reduces the two
        copies' gradients, and the checkpoint stores it as the embedding."""
        pg_collection = pg_collection if pg_collection is not None else model_process_groups()
        super().__init__(config, pg_collection=pg_collection)
        self.config = config
        self.model_type = ModelType.encoder_or_decoder   # read by megatron-core's schedules
        self.vocab_size = vocab_size
        self.pre_process, self.post_process = pre_process, post_process
        self.share_embeddings_and_output_weights = config.share_embeddings_and_output_weights
        self.vp_stage = vp_stage
        self.layer_range = layer_range if layer_range is not None else range(config.num_layers)
        self.input_tensor = None
        if recompute and (config.hidden_dropout or config.attention_dropout):
            raise ValueError("activation recomputation (training.recompute='full') needs "
                             "hidden_dropout = attention_dropout = 0")
        self.recompute = recompute
        self.tp_group = tp_group = self.pg_collection.tp
        cp_group = getattr(self.pg_collection, "cp", None)
        self.cp_size = get_pg_size(cp_group) if cp_group is not None else 1
        self.cp_rank = get_pg_rank(cp_group) if cp_group is not None else 0
        _check_tensor_parallel_group(config, vocab_size, get_pg_size(tp_group))

        @contextlib.contextmanager
        def seeded(offset: int):
            if init_seed is None:
                yield
                return
            with torch.random.fork_rng(devices=[]):   # weights are drawn on the CPU
                torch.manual_seed(init_seed + offset)
                yield

        if pre_process:
            with seeded(0):
                self.embedding = LanguageModelEmbedding(config, vocab_size, config.seq_length,
                                                        position_embedding_type="none",
                                                        tp_group=tp_group)
        self.residual_stream = residual_stream_applies(config)
        specs = layer_specs(fused_swiglu=config.use_te_activation_func,
                            residual_stream=self.residual_stream)
        # megatron-core's TransformerLayer adds its own (even-split) pipeline offset to
        # layer_number; subtract it so every layer keeps its global number.
        megatron_offset = get_transformer_layer_offset(config, vp_stage,
                                                       get_pg_rank(self.pg_collection.pp))
        layers = []
        for index in self.layer_range:
            symbol = config.layer_pattern[index]
            with seeded(1 + index):
                if symbol in "TM":
                    layers.append(build_module(specs[symbol], config, layer_number=index + 1,
                                               tp_group=tp_group, cp_group=cp_group))
                else:
                    layers.append(build_module(specs[symbol], config=config,
                                               layer_number=index + 1 - megatron_offset,
                                               pg_collection=self.pg_collection,
                                               vp_stage=vp_stage))
        self.layers = nn.ModuleList(layers)
        if post_process:
            self.final_norm = RMSNorm(config, config.hidden_size, eps=config.layernorm_epsilon)
            tied = self.share_embeddings_and_output_weights
            # tied: no weight of its own next to the embedding; a later stage's copy is drawn as
            # the embedding is (its seed and init method), so it starts equal to it
            with seeded(0 if tied else 1 + config.num_layers):
                self.output_layer = tensor_parallel.ColumnParallelLinear(
                    config.hidden_size, vocab_size, config=config,
                    init_method=config.embedding_init_method if tied else config.init_method,
                    bias=False, gather_output=False, skip_bias_add=False, tp_group=tp_group,
                    skip_weight_param_allocation=tied and pre_process)
        self.attention_rope_dim = config.kv_channels if "*" in config.layer_pattern else None
        self.mixer_rope_dim = (config.mamba_state_dim if config.uses_mixer
                               and config.mixer_position_embedding == "rope" else None)
        self.setup_embeddings_and_output_layer()

    def output_weight(self) -> Optional[Tensor]:
        """The weight the LM head multiplies by: the embedding's when tied, else its own (None)."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return None

    def set_input_tensor(self, input_tensor) -> None:
        """megatron-core's schedules hand a pipeline stage its input activations [S, B, d]
        (S/tp under SP) here; the first stage gets None and embeds the tokens."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int,
                                 dtype: Optional[torch.dtype] = None) -> HybridCache:
        """An empty decoding cache for ``batch_size`` rows of up to ``max_seqlen`` tokens (it
        grows past that): each ``T`` / ``M`` and ``*`` layer's own ``allocate_inference_cache``
        (``transmamba_kernels.reference.cache``), None for ``-``. One process: TP = CP = PP = 1."""
        if not (self.pre_process and self.post_process):
            raise NotImplementedError("decoding runs the whole model in one process (PP = 1)")
        layers = []
        for index, layer in zip(self.layer_range, self.layers):
            symbol = self.config.layer_pattern[index]
            if symbol in "TM":
                layers.append(layer.allocate_inference_cache(batch_size, max_seqlen, dtype))
            elif symbol == "*":
                layers.append(layer.self_attention.allocate_inference_cache(batch_size, max_seqlen,
                                                                            dtype))
            else:
                layers.append(None)
        return HybridCache(layers)

    def prefill(self, input_ids: Tensor, cache: HybridCache) -> Tensor:
        """Logits [B, L, V] of a prompt ``input_ids`` [B, L] (unpadded rows of one length),
        running every layer once and leaving ``cache`` (empty, from
        ``allocate_inference_cache``) ready for ``step`` at position L. The logits are the
        training forward's (exactly, with the torch backend)."""
        if cache.seen_tokens:
            raise ValueError(f"prefill into a cache that has seen {cache.seen_tokens} tokens")
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)[None]
        hidden = self.embedding(input_ids=input_ids, position_ids=positions)          # [S, B, d]
        mixer_rope = attention_rope = None
        if self.mixer_rope_dim:
            mixer_rope = rope_table(length, self.mixer_rope_dim, self.config.rope_theta,
                                    input_ids.device)
        if self.attention_rope_dim:
            attention_rope = rope_table(length, self.attention_rope_dim, self.config.rope_theta,
                                        input_ids.device)
        for index, layer, layer_cache in zip(self.layer_range, self.layers, cache.layers):
            symbol = self.config.layer_pattern[index]
            if symbol in "TM":
                hidden, _ = layer(hidden, rotary_pos_emb=mixer_rope, inference_cache=layer_cache)
            elif symbol == "*":
                out = layer.self_attention(layer.input_layernorm(hidden), None,
                                           rotary_pos_emb=attention_rope,
                                           inference_cache=layer_cache)
                hidden = _add_attention(hidden, *out)
            else:
                hidden, _ = layer(hidden, attention_mask=None)
        cache.seen_tokens = length
        return self._logits(hidden)

    def step(self, input_ids: Tensor, cache: HybridCache) -> Tensor:
        """One token per row, ``input_ids`` [B, 1], at position ``cache.seen_tokens`` -> logits
        [B, 1, V]: each ``T`` / ``M`` and ``*`` layer's ``step`` on its cache (``-`` layers run
        their forward). The per-token cost of a ``T`` layer stops growing at its TransPoint."""
        hidden = self.embedding(input_ids=input_ids, position_ids=None)               # [1, B, d]
        for index, layer, layer_cache in zip(self.layer_range, self.layers, cache.layers):
            symbol = self.config.layer_pattern[index]
            if symbol in "TM":
                hidden = layer.step(hidden, layer_cache)
            elif symbol == "*":
                out = layer.self_attention.step(layer.input_layernorm(hidden), layer_cache)
                hidden = _add_attention(hidden, *out)
            else:
                hidden, _ = layer(hidden, attention_mask=None)
        cache.seen_tokens += 1
        return self._logits(hidden)

    def _logits(self, hidden: Tensor) -> Tensor:
        logits, _ = self.output_layer(self.final_norm(hidden), weight=self.output_weight())
        return logits.transpose(0, 1).contiguous()                              # [B, S, V]

    def forward(self, input_ids: Tensor, position_ids: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """input_ids, labels: [B, S]. Returns loss [B, S] with labels, else logits [B, S, V/tp];
        a stage without the LM head returns its hidden states [S, B, d] (S/tp under SP).

        ``cu_seqlens``: packed documents, [num_docs + 1] integer offsets of the documents in
        the row-major flattened B*S tokens (megatron's ``PackedSeqParams.cu_seqlens_q`` of the
        micro-batch seen as one packed row), every row start r*S among them. Each document
        then runs as if it were alone in its row: the same on every TP rank and every
        pipeline stage (each stage passes the same ``cu_seqlens``). Under context parallelism
        every CP rank passes the whole micro-batch's ``cu_seqlens`` (offsets in B x R S)."""
        seq_len = input_ids.shape[1]      # this context-parallel rank's shard of T = seq_len x CP
        documents = None
        if cu_seqlens is not None:
            documents = PackedDocuments.from_cu_seqlens(
                cu_seqlens, input_ids.shape[0], seq_len * self.cp_size).shard(self.cp_rank,
                                                                              self.cp_size)
        if position_ids is None:
            start = self.cp_rank * seq_len
            position_ids = torch.arange(start, start + seq_len, device=input_ids.device)[None]
        if self.pre_process:
            hidden = self.embedding(input_ids=input_ids, position_ids=position_ids)  # [S, B, d]
        else:
            hidden = self.input_tensor                      # from the previous stage
        # RoPE tables: '*' layers rotate their head dim, mixers their state dim N. Under context
        # parallelism '*' layers get this shard's global positions (packed: each token's
        # position in its document); mixers get every position (their attention prefix reads
        # the keys of earlier shards).
        attention_rope = mixer_rope = None
        total = seq_len * self.cp_size
        if self.attention_rope_dim:
            attention_rope = rope_table(total, self.attention_rope_dim, self.config.rope_theta,
                                        input_ids.device)
            if documents is not None:   # [S, B, 1, dim]: positions inside each document
                attention_rope = documents.rotary_table(attention_rope)
            elif self.cp_size > 1:
                attention_rope = attention_rope[self.cp_rank * seq_len:][:seq_len]
        if self.mixer_rope_dim:
            mixer_rope = rope_table(total, self.mixer_rope_dim, self.config.rope_theta, input_ids.device)
        residual = None      # the residual stream is hidden + residual (None: hidden alone)
        for index, layer in zip(self.layer_range, self.layers):
            rope = mixer_rope if self.config.layer_pattern[index] in "TM" else attention_rope
            if self.residual_stream and _takes_residual_stream(layer):
                hidden, residual = self._run(_run_stream_layer, layer, hidden, residual, rope,
                                             documents)
            else:
                if residual is not None:
                    hidden, residual = hidden + residual, None
                hidden = self._run(_run_layer, layer, hidden, rope, documents)
        if not self.post_process:   # one tensor to the next stage
            return hidden if residual is None else hidden + residual
        hidden, _ = self.final_norm.add_and_norm(hidden, residual)  # [S/tp, B, d] under SP
        logits, _ = self.output_layer(hidden, weight=self.output_weight())   # [S, B, V/tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        labels = labels.transpose(0, 1).contiguous()                # [S, B]
        if self.config.mixer_backend == "triton":   # fused: no float32 copy of the logits
            from transmamba_kernels.cross_entropy.cross_entropy import cross_entropy_triton

            loss = cross_entropy_triton(logits.view(-1, logits.shape[-1]), labels.view(-1),
                                        self.tp_group).view(labels.shape)
        else:
            loss = vocab_parallel_cross_entropy(logits.float(), labels, self.tp_group)
        return loss.transpose(0, 1).contiguous()                    # [B, S]

    def _run(self, run_layer, *args):
        """``run_layer(*args)``, or with ``recompute`` under its checkpoint (the layer keeps only
        its inputs and runs again in backward)."""
        if self.recompute and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(run_layer, *args, use_reentrant=False)
        return run_layer(*args)

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
        if self.share_embeddings_and_output_weights:
            # a last stage's copy is stored as a replica of the embedding: one tensor on disk
            self.tie_embeddings_and_output_weights_state_dict(
                sharded, f"{prefix}output_layer.weight", f"{prefix}embedding.word_embeddings.weight",
                metadata)
        return sharded


def _add_attention(hidden: Tensor, out: Tensor, bias: Optional[Tensor]) -> Tensor:
    """A ``*`` layer's residual add in evaluation (megatron's bias-dropout-add without dropout)."""
    return hidden + (out if bias is None else out + bias)


def _run_layer(layer, hidden: Tensor, rope, documents: Optional[PackedDocuments] = None) -> Tensor:
    # mixers start RoPE at each document themselves; megatron's layers pass packed_seq_params
    # to their attention
    return layer(hidden, attention_mask=None, rotary_pos_emb=rope,
                 packed_seq_params=documents)[0]


def _run_stream_layer(layer, hidden: Tensor, residual: Optional[Tensor], rope,
                      documents: Optional[PackedDocuments] = None) -> tuple[Tensor, Tensor]:
    return layer(hidden, attention_mask=None, rotary_pos_emb=rope, packed_seq_params=documents,
                 residual=residual)


def _takes_residual_stream(layer) -> bool:
    # A layer whose forward was replaced on the instance (training/graphs.py's CUDA graphs)
    # takes the stream when that forward says so.
    replaced = vars(layer).get("forward")
    return replaced is None or getattr(replaced, "takes_residual_stream", False)


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
    tensor-parallel ones (split evenly) count tp_size times, the replicated ones once. A tied
    embedding counts once: one parameter on one stage, and a last stage's copy is ``shared``."""
    return sum(p.numel() * (tp_size if getattr(p, "tensor_model_parallel", False) else 1)
               for p in model.parameters() if not getattr(p, "shared", False))
