"""megatron-core's ``LanguageModule`` with the two methods our language model cannot take as they
are (inventory: ``language_module_attention_backend``, ``language_module_tied_embedding_setup``).
"""

from __future__ import annotations

import torch
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.utils import get_pg_size


class LanguageModuleOnAnyDevice(LanguageModule):
    """A ``LanguageModule`` whose subclass sets ``pre_process``, ``post_process``, ``embedding``
    (first stage), ``output_layer`` (last stage) and ``share_embeddings_and_output_weights``
    before calling ``setup_embeddings_and_output_layer``."""

    def _set_attention_backend(self) -> None:
        """LanguageModule sets Transformer Engine's NVTE_*_ATTN variables here; our '*' layers
        pick their attention in models/specs.py, so nothing is set."""

    def setup_embeddings_and_output_layer(self) -> None:
        """megatron-core's LanguageModule method, with the stage read from pre_process /
        post_process and the weight kept on its device (megatron-core moves it to CUDA, which
        gloo on CPU cannot): mark the embedding and LM head weights, and with tied weights on
        two stages copy the embedding into the last stage's weight (zeros + all-reduce over the
        embedding group of the first and last stage; exact)."""
        if self.pre_process:
            self.embedding.word_embeddings.weight.is_embedding_or_output_parameter = True
        if self.post_process and self.output_layer.weight is not None:
            self.output_layer.weight.is_embedding_or_output_parameter = True
        if not self.share_embeddings_and_output_weights:
            return
        weight = self.shared_embedding_or_output_weight()
        if self.pre_process and self.post_process:
            weight.zero_out_wgrad = True             # one parameter used twice (megatron's mark)
            return
        if not (self.pre_process or self.post_process):
            return
        weight.shared_embedding = True                # own DDP bucket; embedding-group all-reduce
        if self.post_process:
            weight.shared = True                      # not counted twice (grad norm, parameters)
        if get_pg_size(self.embd_group) > 1 and self._is_in_embd_group():
            with torch.no_grad():
                if self.post_process:
                    weight.zero_()
                buffer = weight.data   # CPU-initialised weights meet NCCL on the GPU
                if torch.distributed.get_backend(self.embd_group) == "nccl":
                    buffer = buffer.cuda()
                torch.distributed.all_reduce(buffer, group=self.embd_group)
                weight.data.copy_(buffer)
