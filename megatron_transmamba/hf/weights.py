"""Weight layouts: tensor-parallel shards <-> full tensors <-> Hugging Face names.

A tensor-parallel rank's ``model.state_dict()`` holds its pieces of the full tensors. The
rules that put the pieces back together follow the model's layout (docs/parallelism.md):
column-parallel weights (embedding, LM head, QKV, ...) split dim 0, row-parallel ones dim 1;
weights made of components split every component on its own: the mixer's ``in_proj`` rows
``[z | x | B | C | dt]``, its conv channels ``[x | B | C]`` and the SwiGLU ``linear_fc1`` rows
``[gate | up]``; norms are replicated. ``merge_tensor_parallel`` and ``split_tensor_parallel``
are exact inverses. ``to_hf`` / ``from_hf`` rename the full tensors to the Hugging Face model's
names (``modeling_transmamba.py``), splitting megatron's fused QKV (grouped per query group:
``[q heads of the group | k | v]``) and ``linear_fc1`` into separate projections. A model with
``share_embeddings_and_output_weights`` has no ``output_layer.weight`` (and no ``lm_head.weight``
on the Hugging Face side, which ties it to ``model.embed_tokens.weight``).
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import Tensor

from megatron_transmamba.config import TransMambaConfig

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_LINEAR_MODULES = ("mixer.in_proj", "mixer.out_proj", "self_attention.linear_qkv",
                   "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


class WeightMismatchError(ValueError):
    """Tensors missing from, or unexpected in, a set of weights (both lists are named)."""

    def __init__(self, what: str, missing: Sequence[str], unexpected: Sequence[str]):
        self.missing, self.unexpected = sorted(missing), sorted(unexpected)
        super().__init__(f"{what}: missing tensors {self.missing or 'none'}; "
                         f"unexpected tensors {self.unexpected or 'none'}")


def expected_megatron_keys(config: TransMambaConfig) -> list[str]:
    """Names of the full model's tensors (no ``_extra_state``), in model order."""
    keys = ["embedding.word_embeddings.weight"]
    for i, symbol in enumerate(config.layer_pattern):
        if symbol in "TM":
            keys += [f"layers.{i}.norm.weight"] + [
                f"layers.{i}.mixer.{n}" for n in ("dt_bias", "A_log", "D", "norm_weight",
                                                  "in_proj.weight", "conv1d.weight",
                                                  "conv1d.bias", "out_proj.weight")]
        elif symbol == "*":
            keys += [f"layers.{i}.input_layernorm.weight",
                     f"layers.{i}.self_attention.linear_proj.weight",
                     f"layers.{i}.self_attention.linear_qkv.weight"]
        else:
            keys += [f"layers.{i}.pre_mlp_layernorm.weight", f"layers.{i}.mlp.linear_fc1.weight",
                     f"layers.{i}.mlp.linear_fc2.weight"]
    keys.append("final_norm.weight")
    return keys if config.share_embeddings_and_output_weights else keys + ["output_layer.weight"]


def extra_state_keys(config: TransMambaConfig) -> list[str]:
    """The ``_extra_state`` entries (None) of megatron's parallel linears in ``state_dict()``."""
    keys = []
    for key in expected_megatron_keys(config):
        module = key.rsplit(".", 1)[0]
        if module.endswith(_LINEAR_MODULES) or module == "output_layer":
            keys.append(f"{module}._extra_state")
    if config.share_embeddings_and_output_weights:     # the LM head module is there, weightless
        keys.append("output_layer._extra_state")
    return keys


def _rule(key: str, config: TransMambaConfig):
    """(kind, arg) for one full-model key: ``("cat", dim)``, ``("components", sizes)`` or
    ``("replicated", None)``."""
    H, P, G, N = (config.mamba_num_heads, config.mamba_head_dim, config.mamba_num_groups,
                  config.mamba_state_dim)
    if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return "cat", 0
    if key == "final_norm.weight":
        return "replicated", None
    name = _LAYER.match(key).group(2)
    if name in ("norm.weight", "input_layernorm.weight", "pre_mlp_layernorm.weight"):
        return "replicated", None
    if name == "mixer.in_proj.weight":
        return "components", (H * P, H * P, G * N, G * N, H)
    if name in ("mixer.conv1d.weight", "mixer.conv1d.bias"):
        return "components", (H * P, G * N, G * N)
    if name == "mlp.linear_fc1.weight":
        return "components", (config.ffn_hidden_size, config.ffn_hidden_size)
    if name in ("mixer.out_proj.weight", "self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
        return "cat", 1
    return "cat", 0        # dt_bias, A_log, D, norm_weight, linear_qkv: split by heads / groups


def _check_keys(what: str, state: dict, config: TransMambaConfig) -> None:
    have = {k for k in state if not k.endswith("._extra_state")}
    want = set(expected_megatron_keys(config))
    if have != want:
        raise WeightMismatchError(what, want - have, have - want)


def merge_tensor_parallel(shards: Sequence[dict], config: TransMambaConfig) -> dict[str, Tensor]:
    """Full (TP = 1) tensors from the ``state_dict()`` of each tensor-parallel rank, in rank order."""
    for rank, shard in enumerate(shards):
        _check_keys(f"tensor-parallel rank {rank} of the checkpoint", shard, config)
    tp = len(shards)
    full = {}
    for key in expected_megatron_keys(config):
        pieces = [shard[key] for shard in shards]
        kind, arg = _rule(key, config)
        if kind == "replicated":
            for rank, piece in enumerate(pieces[1:], 1):
                if not torch.equal(piece, pieces[0]):
                    raise ValueError(f"{key}: replicated tensor differs between rank 0 and {rank}")
            full[key] = pieces[0].clone()
        elif kind == "cat":
            full[key] = torch.cat(pieces, dim=arg)
        else:
            local = [s // tp for s in arg]
            per_rank = [torch.split(piece, local, dim=0) for piece in pieces]
            full[key] = torch.cat([torch.cat([parts[c] for parts in per_rank])
                                   for c in range(len(arg))])
    return full


def split_tensor_parallel(full: dict, config: TransMambaConfig, tp: int) -> list[dict]:
    """Each rank's ``state_dict()`` (with megatron's ``_extra_state`` entries) for TP = ``tp``."""
    _check_keys("the full model weights", full, config)
    shards = [{} for _ in range(tp)]
    for key in expected_megatron_keys(config):
        kind, arg = _rule(key, config)
        tensor = full[key]
        if kind == "replicated":
            parts = [tensor] * tp
        elif kind == "cat":
            if tensor.shape[arg] % tp:
                raise ValueError(f"{key}: dim {arg} of size {tensor.shape[arg]} does not split "
                                 f"over {tp} tensor-parallel ranks")
            parts = tensor.chunk(tp, dim=arg)
        else:
            if any(s % tp for s in arg):
                raise ValueError(f"{key}: components {list(arg)} do not split over {tp} ranks")
            comps = [c.chunk(tp) for c in torch.split(tensor, list(arg))]
            parts = [torch.cat([c[r] for c in comps]) for r in range(tp)]
        for rank in range(tp):
            shards[rank][key] = parts[rank].clone().contiguous()
    for rank in range(tp):
        for key in extra_state_keys(config):
            shards[rank][key] = None
    return shards


def to_hf(full: dict, config: TransMambaConfig) -> dict[str, Tensor]:
    """Hugging Face tensors (``TransMambaForCausalLM``) from the full megatron tensors."""
    _check_keys("the full model weights", full, config)
    out = {"model.embed_tokens.weight": full["embedding.word_embeddings.weight"],
           "model.norm.weight": full["final_norm.weight"]}
    if not config.share_embeddings_and_output_weights:
        out["lm_head.weight"] = full["output_layer.weight"]
    for i, symbol in enumerate(config.layer_pattern):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        if symbol in "TM":
            out[dst + "norm.weight"] = full[src + "norm.weight"]
            for name in ("dt_bias", "A_log", "D", "in_proj.weight", "conv1d.weight",
                         "conv1d.bias", "out_proj.weight"):
                out[f"{dst}mixer.{name}"] = full[f"{src}mixer.{name}"]
            out[dst + "mixer.norm.weight"] = full[src + "mixer.norm_weight"]
        elif symbol == "*":
            out[dst + "norm.weight"] = full[src + "input_layernorm.weight"]
            q, k, v = _split_qkv(full[src + "self_attention.linear_qkv.weight"], config)
            out[dst + "attention.q_proj.weight"] = q
            out[dst + "attention.k_proj.weight"] = k
            out[dst + "attention.v_proj.weight"] = v
            out[dst + "attention.o_proj.weight"] = full[src + "self_attention.linear_proj.weight"]
        else:
            out[dst + "norm.weight"] = full[src + "pre_mlp_layernorm.weight"]
            gate, up = full[src + "mlp.linear_fc1.weight"].chunk(2)
            out[dst + "mlp.gate_proj.weight"] = gate
            out[dst + "mlp.up_proj.weight"] = up
            out[dst + "mlp.down_proj.weight"] = full[src + "mlp.linear_fc2.weight"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def from_hf(hf: dict, config: TransMambaConfig) -> dict[str, Tensor]:
    """Full megatron tensors from Hugging Face tensors; the inverse of ``to_hf``."""
    names = {}
    for i, symbol in enumerate(config.layer_pattern):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        if symbol in "TM":
            names[src + "norm.weight"] = dst + "norm.weight"
            for name in ("dt_bias", "A_log", "D", "in_proj.weight", "conv1d.weight",
                         "conv1d.bias", "out_proj.weight"):
                names[f"{src}mixer.{name}"] = f"{dst}mixer.{name}"
            names[src + "mixer.norm.weight"] = dst + "mixer.norm_weight"
        elif symbol == "*":
            names[src + "norm.weight"] = dst + "input_layernorm.weight"
            names[src + "attention.o_proj.weight"] = dst + "self_attention.linear_proj.weight"
            for n in ("q", "k", "v"):
                names[f"{src}attention.{n}_proj.weight"] = None
        else:
            names[src + "norm.weight"] = dst + "pre_mlp_layernorm.weight"
            names[src + "mlp.down_proj.weight"] = dst + "mlp.linear_fc2.weight"
            names[src + "mlp.gate_proj.weight"] = names[src + "mlp.up_proj.weight"] = None
    names.update({"model.embed_tokens.weight": "embedding.word_embeddings.weight",
                  "model.norm.weight": "final_norm.weight"})
    if not config.share_embeddings_and_output_weights:
        names["lm_head.weight"] = "output_layer.weight"
    elif "lm_head.weight" in hf:           # tied, but written under both names: must be one tensor
        if "model.embed_tokens.weight" in hf and \
                not torch.equal(hf["lm_head.weight"], hf["model.embed_tokens.weight"]):
            raise ValueError("lm_head.weight differs from model.embed_tokens.weight, but the "
                             "model ties them (share_embeddings_and_output_weights)")
        hf = {k: v for k, v in hf.items() if k != "lm_head.weight"}
    if set(hf) != set(names):
        raise WeightMismatchError("the Hugging Face weights", set(names) - set(hf), set(hf) - set(names))
    full = {dst: hf[src].clone() for src, dst in names.items() if dst is not None}
    for i, symbol in enumerate(config.layer_pattern):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        if symbol == "*":
            full[dst + "self_attention.linear_qkv.weight"] = _fuse_qkv(
                *(hf[f"{src}attention.{n}_proj.weight"] for n in ("q", "k", "v")), config)
        elif symbol == "-":
            full[dst + "mlp.linear_fc1.weight"] = torch.cat(
                [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]])
    return {key: full[key] for key in expected_megatron_keys(config)}


def _split_qkv(qkv: Tensor, config: TransMambaConfig) -> tuple[Tensor, Tensor, Tensor]:
    groups, dim = config.num_query_groups, config.kv_channels
    per_group = config.num_attention_heads // groups
    grouped = qkv.view(groups, (per_group + 2) * dim, -1)
    q, k, v = torch.split(grouped, [per_group * dim, dim, dim], dim=1)
    return (q.reshape(groups * per_group * dim, -1), k.reshape(groups * dim, -1),
            v.reshape(groups * dim, -1))


def _fuse_qkv(q: Tensor, k: Tensor, v: Tensor, config: TransMambaConfig) -> Tensor:
    groups, dim = config.num_query_groups, config.kv_channels
    per_group = config.num_attention_heads // groups
    hidden = q.shape[-1]
    fused = torch.cat([q.view(groups, per_group * dim, hidden), k.view(groups, dim, hidden),
                       v.view(groups, dim, hidden)], dim=1)
    return fused.reshape(-1, hidden)
