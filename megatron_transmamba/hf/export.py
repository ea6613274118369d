"""Training checkpoint <-> Hugging Face folder, verified by running both models.

``export_checkpoint`` reads a checkpoint folder (``iter_XXXXXXX``: dist_checkpointing's whole
tensors, whose mixer components are joined) into full tensors, and writes a
``trust_remote_code`` folder: config.json (``model_type`` transmamba,
``architectures``, ``auto_map`` and the training run config for the way back),
configuration/modeling files and the reference math they import (``transmamba_kernels.reference``,
verbatim), sharded safetensors with ``model.safetensors.index.json``,
generation_config.json and tokenizer files. Everything is written into a temporary folder that
is renamed only after both models ran on a sample batch longer than the largest TransPoint and
their logits agree within ``tolerance``. ``import_hf`` writes a model-only training checkpoint
from such a folder, which loads at any tensor / pipeline / data-parallel layout.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

import torch

from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.hf import weights as W
from megatron_transmamba.training import checkpoint as ckpt
import transmamba_kernels.reference as _reference

REMOTE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote")
REMOTE_FILES = ("configuration_transmamba.py", "modeling_transmamba.py")
# the reference math the remote model imports (``from .mixer import ...``): every module of
# transmamba_kernels.reference, copied verbatim next to modeling_transmamba.py
REFERENCE_DIR = os.path.dirname(os.path.abspath(_reference.__file__))
REFERENCE_FILES = tuple(sorted(name for name in os.listdir(REFERENCE_DIR)
                               if name.endswith(".py") and name != "__init__.py"))
INDEX_FILE = "model.safetensors.index.json"


class VerificationError(RuntimeError):
    """The exported model does not reproduce the training model's logits."""


def resolve_checkpoint(path: str) -> str:
    """An intact ``iter_XXXXXXX`` folder: ``path`` itself, or the newest intact one inside it
    (``checkpoint.resolve_verified``: sizes and checksums checked before anything is read)."""
    return ckpt.resolve_verified(path)


def model_config_from_run_config(run_config: dict) -> TransMambaConfig:
    """The TP = 1, float32 model config of a stored run config (``RunConfig.to_dict()``). Only
    the ``model`` section is read, so checkpoints outlive changes to the other sections."""
    from megatron_transmamba.training.config import build_run_config

    model = dict(run_config.get("model", {}))
    if "layer_pattern" in model:                  # '|' marks pipeline stages, not layers
        model["layer_pattern"] = model["layer_pattern"].replace("|", "")
    cfg = build_run_config({"model": model})
    return TransMambaConfig(**cfg.model, use_cpu_initialization=True, params_dtype=torch.float32)


def read_checkpoint(path: str) -> tuple[dict, TransMambaConfig, dict, int]:
    """(full tensors, model config, run config dict, step) of a training checkpoint saved at any
    tensor / pipeline (and virtual pipeline) parallel layout: it stores whole tensors."""
    path = resolve_checkpoint(path)
    info = ckpt.read_info(path)
    run_config = _run_config_of(path, info)
    config = model_config_from_run_config(run_config)
    full = _join_components(ckpt.load_model_tensors(path))
    return W.merge_tensor_parallel([full], config), config, run_config, int(info["step"])


def _join_components(stored: dict) -> dict:
    """The mixer's in_proj and conv1d tensors from their stored components (``<key>.z``, ...,
    see parallel/tensor_parallel.py); every other tensor is stored under its own name."""
    from megatron_transmamba.layers.transmamba_mixer import CONV_COMPONENTS, IN_PROJ_COMPONENTS

    full, parts = {}, {}
    for key, tensor in stored.items():
        base, _, last = key.rpartition(".")
        if base.endswith("mixer.in_proj.weight") and last in IN_PROJ_COMPONENTS or \
                base.endswith(("mixer.conv1d.weight", "mixer.conv1d.bias")) and last in CONV_COMPONENTS:
            parts.setdefault(base, {})[last] = tensor
        else:
            full[key] = tensor
    for base, components in parts.items():
        names = IN_PROJ_COMPONENTS if base.endswith("in_proj.weight") else CONV_COMPONENTS
        missing = [n for n in names if n not in components]
        if missing:
            raise ValueError(f"{base}: components {missing} missing from the checkpoint")
        full[base] = torch.cat([components[n] for n in names])
    return full


def _run_config_of(path: str, state: dict) -> dict:
    if state.get("config") is None:
        raise ValueError(f"{path}: the checkpoint holds no run config ('config')")
    return state["config"]


def hf_config_dict(config: TransMambaConfig, vocab_size: int, run_config: dict, eos: Optional[int],
                   dtype: str = "float32") -> dict:
    low, high = config.dt_limit
    return {
        "model_type": "transmamba",
        "architectures": ["TransMambaForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_transmamba.TransMambaConfig",
                     "AutoModelForCausalLM": "modeling_transmamba.TransMambaForCausalLM"},
        "vocab_size": vocab_size, "hidden_size": config.hidden_size,
        "layer_pattern": config.layer_pattern,
        "transpoints": [config.transpoint_of_layer(i) if s in "TM" else None
                        for i, s in enumerate(config.layer_pattern)],
        "mamba_num_heads": config.mamba_num_heads, "mamba_head_dim": config.mamba_head_dim,
        "mamba_num_groups": config.mamba_num_groups, "mamba_state_dim": config.mamba_state_dim,
        "mamba_conv_kernel": config.mamba_conv_kernel, "ssd_chunk_size": config.ssd_chunk_size,
        "dt_limit": [float(low), None if high == float("inf") else float(high)],
        "mixer_position_embedding": config.mixer_position_embedding,
        "rope_theta": config.rope_theta, "num_attention_heads": config.num_attention_heads,
        "num_query_groups": config.num_query_groups, "kv_channels": config.kv_channels,
        "ffn_hidden_size": config.ffn_hidden_size, "layernorm_epsilon": config.layernorm_epsilon,
        "seq_length": config.seq_length,
        "tie_word_embeddings": config.share_embeddings_and_output_weights, "dtype": dtype,
        "eos_token_id": eos, "bos_token_id": None, "pad_token_id": eos,
        "training_run_config": json.loads(json.dumps(run_config, default=str)),
    }


def write_safetensors(tensors: dict, folder: str, max_shard_bytes: int) -> None:
    """Shards ``model-0000i-of-0000n.safetensors`` of at most ``max_shard_bytes`` (one tensor
    may exceed it) and ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, file), metadata={"format": "pt"})
        for name, tensor in shard.items():
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)


def read_safetensors(folder: str) -> dict:
    from safetensors.torch import load_file

    with open(os.path.join(folder, INDEX_FILE)) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for file in files:
        out.update(load_file(os.path.join(folder, file)))
    return out


def byte_tokenizer_json() -> dict:
    """A ``tokenizers`` file for the ByteTokenizer: byte b is id b (ByteLevel alphabet, no
    merges, no regex split) and ``<|endoftext|>`` is 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = {}
    # The ByteLevel alphabet is GPT-2's bytes_to_unicode: recompute the byte -> char mapping.
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    extra = 0
    for b in range(256):
        if b in printable:
            byte_to_char[b] = chr(b)
        else:
            byte_to_char[b] = chr(256 + extra)
            extra += 1
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return json.loads(tok.to_str())


def write_tokenizer(folder: str, run_config: dict) -> Optional[int]:
    """tokenizer.json + tokenizer_config.json; returns the end-of-document id."""
    from megatron_transmamba.data.tokenizer import EOD_TOKEN, build_tokenizer

    data = run_config.get("data", {})
    kind, path = data.get("tokenizer", "byte"), data.get("tokenizer_path")
    tokenizer = build_tokenizer(kind, path)
    target = os.path.join(folder, "tokenizer.json")
    if kind == "byte":
        with open(target, "w") as f:
            json.dump(byte_tokenizer_json(), f)
    else:
        shutil.copyfile(path, target)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD_TOKEN,
                   "pad_token": EOD_TOKEN, "model_max_length": 10 ** 9,
                   "clean_up_tokenization_spaces": False}, f, indent=1)
    return tokenizer.eod


def write_hf_folder(folder: str, full: dict, config: TransMambaConfig, run_config: dict,
                    max_shard_bytes: int = 2 * 1024 ** 3) -> None:
    os.makedirs(folder, exist_ok=True)
    eos = write_tokenizer(folder, run_config)
    embedding = full["embedding.word_embeddings.weight"]
    dtype = str(embedding.dtype).replace("torch.", "")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config_dict(config, embedding.shape[0], run_config, eos, dtype), f, indent=1)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos, "pad_token_id": eos, "do_sample": False,
                   "max_new_tokens": 64}, f, indent=1)
    for directory, names in ((REMOTE_DIR, REMOTE_FILES), (REFERENCE_DIR, REFERENCE_FILES)):
        for name in names:
            shutil.copyfile(os.path.join(directory, name), os.path.join(folder, name))
    write_safetensors(W.to_hf(full, config), folder, max_shard_bytes)


def ensure_single_process_group() -> bool:
    """Initialise a one-process group (megatron's parallel state) when none is there; True if
    this call created it."""
    from megatron_transmamba.parallel.initialize import initialize_distributed, is_initialized

    if is_initialized():
        return False
    initialize_distributed()
    return True


def build_training_model(full: dict, config: TransMambaConfig):
    """Our TP = 1 model (float32, eval mode) holding ``full``. Needs megatron's parallel state
    (``ensure_single_process_group``)."""
    from megatron_transmamba.models.language_model import TransMambaLanguageModel

    vocab = full["embedding.word_embeddings.weight"].shape[0]
    model = TransMambaLanguageModel(config, vocab)
    state = {**full, **{k: None for k in W.extra_state_keys(config)}}
    model.load_state_dict(state, strict=True)
    return model.eval()


def sample_batch(config: TransMambaConfig, vocab_size: int, length: Optional[int] = None):
    """Two rows of random tokens, longer than the largest TransPoint (seeded)."""
    largest = max([config.transpoint_of_layer(i) for i, s in enumerate(config.layer_pattern)
                   if s in "TM"] or [0])
    length = length or max(largest + 8, 16)
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (2, length), generator=gen)


def load_hf_model(folder: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                dtype=torch.float32).eval()


@torch.no_grad()
def verify(folder: str, full: dict, config: TransMambaConfig, tolerance: float,
           length: Optional[int] = None) -> float:
    """Max abs logit difference of our model and the folder's HF model on a sample batch;
    raises VerificationError beyond ``tolerance``."""
    created = ensure_single_process_group()
    try:
        ours = build_training_model(full, config)
        hf = load_hf_model(folder)
        tokens = sample_batch(config, full["embedding.word_embeddings.weight"].shape[0], length)
        diff = (ours(tokens).float() - hf(tokens, use_cache=False).logits.float()).abs().max().item()
    finally:
        if created:
            from megatron_transmamba.parallel.initialize import destroy_distributed
            destroy_distributed()
    if not diff <= tolerance:
        raise VerificationError(f"exported model's logits differ from the training model's by "
                                f"{diff:.3e} > tolerance {tolerance:.1e} on a [2, {tokens.shape[1]}] "
                                "sample batch; nothing was written")
    return diff


def export_checkpoint(checkpoint: str, output: str, verify_logits: bool = True,
                      tolerance: float = 1e-3, max_shard_bytes: int = 2 * 1024 ** 3,
                      overwrite: bool = False) -> dict:
    """Export a training checkpoint to the Hugging Face folder ``output`` (atomic). Returns a
    summary: step, tensor count, max abs logit difference (None without verification)."""
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(f"{output} exists (pass overwrite=True / --overwrite)")
    full, config, run_config, step = read_checkpoint(checkpoint)
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(output) + ".tmp-", dir=parent)
    try:
        write_hf_folder(tmp, full, config, run_config, max_shard_bytes)
        # the user's umask, not mkdtemp's 0700 nor safetensors' 0600
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)
        for name in os.listdir(tmp):
            path = os.path.join(tmp, name)
            os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)
        diff = verify(tmp, full, config, tolerance) if verify_logits else None
        if os.path.exists(output):
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"step": step, "tensors": len(full), "max_abs_logit_diff": diff}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_hf_folder(folder: str) -> tuple[dict, TransMambaConfig, dict]:
    """(full megatron tensors, model config, run config) of an exported folder."""
    with open(os.path.join(folder, "config.json")) as f:
        hf_config = json.load(f)
    if hf_config.get("model_type") != "transmamba" or "training_run_config" not in hf_config:
        raise ValueError(f"{folder}: not a TransMamba folder written by megatron_transmamba.hf "
                         "(config.json needs model_type 'transmamba' and training_run_config)")
    run_config = hf_config["training_run_config"]
    config = model_config_from_run_config(run_config)
    return W.from_hf(read_safetensors(folder), config), config, run_config


def import_hf(folder: str, save: str, tensor_model_parallel_size: int = 1, step: int = 0) -> str:
    """Write a model-only training checkpoint ``<save>/iter_<step>`` (atomic, with
    checkpoint.json and ``latest``) in the dist_checkpointing format: it loads at any
    tensor / pipeline / data-parallel layout. ``tensor_model_parallel_size`` is only checked
    (the model must split at it) and recorded in the stored run config. Returns its path."""
    full, config, run_config = read_hf_folder(folder)
    tp = tensor_model_parallel_size
    W.split_tensor_parallel(full, config, tp)                # raises when TP does not divide
    run_config = json.loads(json.dumps(run_config))
    parallel = run_config.setdefault("parallel", {})
    parallel.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
    parallel.pop("virtual_pipeline_model_parallel_size", None)
    if tp == 1:
        parallel["sequence_parallel"] = False
    if "layer_pattern" in run_config.get("model", {}):
        run_config["model"]["layer_pattern"] = config.layer_pattern      # no stage marks
    created = ensure_single_process_group()
    try:
        model = build_training_model(full, config)
        return ckpt.save_model_checkpoint(save, step, model, run_config)
    finally:
        if created:
            from megatron_transmamba.parallel.initialize import destroy_distributed
            destroy_distributed()
