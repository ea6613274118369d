"""Autoregressive generation with our TransMambaLanguageModel (TP = 1) and its decoding cache.

The model does the work (models/language_model.py): ``allocate_inference_cache`` makes each
layer's cache, ``prefill`` runs every layer once over the prompt (its logits are the training
forward's) and leaves the caches ready, ``step`` decodes one token. A ``T`` layer keeps the
prompt's keys, values and dt while the sequence is before its TransPoint p, turns them into the
exact SSM state with the Memory Converter once the token at p - 1 is processed, and from then on
costs one SSM step per token with a constant memory; ``*`` layers keep a growing KV cache. The
math is ``transmamba_kernels.reference`` (the same files the exported Hugging Face model runs).
Batches are unpadded prompts of one length.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from transmamba_kernels.reference.cache import HybridCache

__all__ = ["HybridCache", "forward_with_cache", "generate"]


@torch.no_grad()
def forward_with_cache(model, input_ids: Tensor, cache: HybridCache) -> Tensor:
    """Logits [B, L, V] of ``input_ids`` [B, L] continuing the sequence in ``cache``: the
    prefill when the cache is empty, else one ``step`` per token."""
    if cache.seen_tokens == 0:
        return model.prefill(input_ids, cache)
    return torch.cat([model.step(input_ids[:, i:i + 1], cache)
                      for i in range(input_ids.shape[1])], dim=1)


@torch.no_grad()
def generate(model, input_ids: Tensor, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_k: Optional[int] = None,
             eos_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
             cache: Optional[HybridCache] = None) -> Tensor:
    """Prompt ``input_ids`` [B, L] followed by up to ``max_new_tokens`` generated tokens.

    Greedy by default; ``do_sample`` draws from softmax(logits / temperature), optionally
    restricted to the ``top_k`` largest. Rows that produced ``eos_token_id`` keep emitting it.
    ``cache``: an empty ``model.allocate_inference_cache(...)`` to inspect afterwards.
    """
    was_training = model.training
    model.eval()
    batch, length = input_ids.shape
    if cache is None:
        cache = model.allocate_inference_cache(batch, length + max_new_tokens)
    logits = forward_with_cache(model, input_ids, cache)[:, -1].float()
    tokens, done = [input_ids], torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        if do_sample:
            scores = logits / temperature
            if top_k:
                kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
                scores = scores.masked_fill(scores < kth, -math.inf)
            next_token = torch.multinomial(F.softmax(scores, dim=-1), 1, generator=generator)[:, 0]
        else:
            next_token = logits.argmax(-1)
        if eos_token_id is not None:
            next_token = torch.where(done, torch.full_like(next_token, eos_token_id), next_token)
            done |= next_token == eos_token_id
        tokens.append(next_token[:, None])
        if step + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
            break
        logits = model.step(next_token[:, None], cache)[:, -1].float()
    model.train(was_training)
    return torch.cat(tokens, dim=1)
