"""Hugging Face export / import / generation of a tiny hybrid model (T, *, M, - layers) on CPU."""

import json
import os
import pathlib
import re
import stat

import pytest
import torch

from helpers import perturb_norms_and_dt
from megatron_transmamba.hf import export as E
from megatron_transmamba.hf import weights as W
from megatron_transmamba.inference.generate import generate
from megatron_transmamba.training import checkpoint as ckpt

# Layers: T (p=16) - * - M - T (p=40) -; seq 64, chunk 16 (prompts cross chunk borders).
RUN_CONFIG = {
    "model": {"layer_pattern": "T-*-M-T-", "hidden_size": 32, "ffn_hidden_size": 64,
              "num_attention_heads": 4, "mamba_num_heads": 4, "mamba_num_groups": 2,
              "mamba_head_dim": 8, "mamba_state_dim": 8, "seq_length": 64,
              "transpoint_schedule": "list", "transpoint_values": [16, 40], "ssd_chunk_size": 16},
    "data": {"tokenizer": "byte"},
}
VOCAB = 260   # 257 padded to a multiple of 4


@pytest.fixture(scope="module")
def exported(megatron_single_process, tmp_path_factory):
    from megatron_transmamba.models.language_model import TransMambaLanguageModel

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    config = E.model_config_from_run_config(RUN_CONFIG)
    model = TransMambaLanguageModel(config, VOCAB).eval()
    perturb_norms_and_dt(model)
    ckpt.save_model_checkpoint(str(root / "train"), 5, model, RUN_CONFIG)
    summary = E.export_checkpoint(str(root / "train"), str(root / "hf"), tolerance=1e-4,
                                  max_shard_bytes=40_000)
    hf = E.load_hf_model(str(root / "hf"))
    return {"root": root, "model": model, "hf": hf, "summary": summary, "config": config}


def test_folder_layout(exported):
    folder = exported["root"] / "hf"
    files = set(os.listdir(folder))
    assert {"config.json", "generation_config.json", "configuration_transmamba.py",
            "modeling_transmamba.py", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json"} <= files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1      # really sharded
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "transmamba" and config["transpoints"] == [16, None, None, None, 0, None, 40, None]
    assert not [f for f in os.listdir(exported["root"]) if ".tmp" in f]
    # the reference math beside the model, verbatim; nothing imports the package
    assert set(E.REFERENCE_FILES) <= files and {"mixer.py", "ssd.py", "memory_converter.py"} <= files
    for name in E.REFERENCE_FILES:
        assert (folder / name).read_bytes() == (pathlib.Path(E.REFERENCE_DIR) / name).read_bytes()
    package_import = re.compile(r"^\s*(from|import)\s+(megatron_transmamba|transmamba_kernels)\b",
                                re.MULTILINE)
    assert not [f for f in files if f.endswith(".py")
                and package_import.search((folder / f).read_text())]
    # the folder and its files get the user's umask, not mkdtemp's 0700
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777 & ~mask
    assert all(stat.S_IMODE(os.stat(folder / f).st_mode) & 0o044 == 0o644 & ~mask & 0o044
               for f in files)


def test_logit_parity_beyond_largest_transpoint(exported):
    tokens = torch.randint(0, VOCAB, (2, 64))
    with torch.no_grad():
        ours = exported["model"](tokens)
        hf = exported["hf"](tokens, use_cache=False).logits
    diff = (ours - hf).abs().max().item()
    assert diff <= 1e-4, diff
    assert exported["summary"]["max_abs_logit_diff"] <= 1e-4


# before the first TransPoint, exactly at it (prefill ends on the Memory Converter), between,
# exactly at the second, after both
@pytest.mark.parametrize("prompt_len", [10, 16, 30, 40, 50])
def test_greedy_generation_matches_our_entry_point(exported, prompt_len):
    prompt = torch.randint(0, 256, (2, prompt_len))
    ours = generate(exported["model"], prompt, max_new_tokens=64)
    hf = exported["hf"].generate(prompt, max_new_tokens=64, do_sample=False, min_new_tokens=64,
                                 eos_token_id=None, pad_token_id=0)
    assert ours.shape == hf.shape == (2, prompt_len + 64)
    assert torch.equal(ours, hf)


def test_cached_decoding_matches_full_forward(exported):
    hf = exported["hf"]
    tokens = torch.randint(0, VOCAB, (1, 60))
    with torch.no_grad():
        full = hf(tokens, use_cache=False).logits
        out = hf(tokens[:, :12], use_cache=True)
        stepped = [out.logits]
        for t in range(12, 60):
            out = hf(tokens[:, t:t + 1], cache=out.cache, use_cache=True)
            stepped.append(out.logits)
    assert (torch.cat(stepped, dim=1) - full).abs().max().item() <= 1e-4


def test_sampling(exported):
    torch.manual_seed(1)
    out = exported["hf"].generate(torch.randint(0, 256, (2, 8)), max_new_tokens=20, do_sample=True,
                                  top_k=20, temperature=0.8, min_new_tokens=20, pad_token_id=0)
    assert out.shape == (2, 28)
    ours = generate(exported["model"], torch.randint(0, 256, (2, 8)), 20, do_sample=True, top_k=20,
                    generator=torch.Generator().manual_seed(0))
    assert ours.shape == (2, 28)


def test_kv_cache_released_after_transpoint(exported):
    hf = exported["hf"]
    tokens = torch.randint(0, 256, (1, 60))
    sizes, kv = [], []
    with torch.no_grad():
        out = hf(tokens[:, :4], use_cache=True)
        for t in range(4, 60):
            cache = out.cache
            sizes.append([cache.layer_nbytes(i) for i in (0, 2, 6)])
            kv.append([cache.kv_length(i) for i in (0, 2, 6)])
            out = hf(tokens[:, t:t + 1], cache=cache, use_cache=True)
    # index j holds the cache after 4 + j tokens
    assert kv[16 - 4 - 1] == [15, 15, 15] and kv[16 - 4] == [0, 16, 16]       # layer 0: p = 16
    assert kv[40 - 4] == [0, 40, 0]                                            # layer 6: p = 40
    after = [s[0] for s in sizes[16 - 4:]]
    assert len(set(after)) == 1 and after[0] < sizes[16 - 4 - 1][0]          # constant, smaller
    assert [s[2] for s in sizes[40 - 4:]] == [after[0]] * (60 - 40)           # p = 40 likewise
    assert kv[-1][1] == 59 and sizes[-1][1] > sizes[0][1]                     # '*' keeps growing
    ours = exported["model"].allocate_inference_cache(1, 45)
    generate(exported["model"], tokens[:, :20], 25, cache=ours)
    assert ours.seen_tokens == 44 and ours.kv_length(2) == 44
    assert ours.kv_length(0) == ours.kv_length(6) == 0 and ours.layers[6].keys is None
    assert ours.layer_nbytes(0) == ours.layer_nbytes(6) == after[0]           # as in HF


def test_round_trip_is_tensor_equal(exported, tmp_path):
    path = E.import_hf(str(exported["root"] / "hf"), str(tmp_path / "back"), 1, step=5)
    info = ckpt.read_info(path)
    assert (info["format_version"], info["step"], info["model_only"]) == (3, 5, True)
    assert ckpt.verify(path) == [] and (tmp_path / "back" / "latest").read_text() == "5\n"
    full, _, _, step = E.read_checkpoint(path)
    original = {k: v for k, v in exported["model"].state_dict().items() if v is not None}
    assert full.keys() == original.keys() and step == 5
    for key, value in original.items():
        assert torch.equal(value, full[key]), key
    # stored per component (z, x, B, C, dt), so it loads at any tensor-parallel size
    shapes = ckpt.tensor_metadata(path)
    assert shapes["layers.0.mixer.in_proj.weight.dt"][0] == (4, 32)
    assert "layers.0.mixer.in_proj.weight" not in shapes


def test_tp_merge_follows_the_mixer_components(exported):
    from megatron_transmamba.parallel.tensor_parallel import local_components

    config = exported["config"]
    full = {k: v for k, v in exported["model"].state_dict().items() if v is not None}
    shards = W.split_tensor_parallel(full, config, 2)
    sections = (32, 32, 16, 16, 4)
    for rank in range(2):
        assert torch.equal(shards[rank]["layers.0.mixer.in_proj.weight"],
                           local_components(full["layers.0.mixer.in_proj.weight"], sections, rank, 2))
    merged = W.merge_tensor_parallel(shards, config)
    assert all(torch.equal(merged[k], full[k]) for k in merged)


def test_failed_verification_leaves_nothing(exported, tmp_path, monkeypatch):
    real = W.to_hf

    def broken(full, config):
        out = real(full, config)
        out["model.layers.0.mixer.D"] = out["model.layers.0.mixer.D"] + 1.0
        return out

    monkeypatch.setattr(W, "to_hf", broken)
    with pytest.raises(E.VerificationError, match="differ"):
        E.export_checkpoint(str(exported["root"] / "train"), str(tmp_path / "bad"))
    assert os.listdir(tmp_path) == []


def test_missing_and_unexpected_tensors_are_named(exported):
    hf = E.read_safetensors(str(exported["root"] / "hf"))
    hf.pop("model.layers.2.attention.k_proj.weight")
    hf["model.layers.9.extra"] = torch.zeros(1)
    with pytest.raises(W.WeightMismatchError, match=r"k_proj.*layers\.9\.extra"):
        W.from_hf(hf, exported["config"])


def test_byte_tokenizer_loads_in_transformers(exported):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(exported["root"] / "hf"))
    ids = tok("héllo\n", add_special_tokens=False)["input_ids"]
    assert ids == list("héllo\n".encode())
    assert tok.decode(ids) == "héllo\n" and tok.eos_token_id == 256
