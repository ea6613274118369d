"""Hugging Face export / import of a model with a tied embedding and LM head
(``model.share_embeddings_and_output_weights``): config.json says ``tie_word_embeddings``, the
safetensors hold the matrix once (``model.embed_tokens.weight``), the remote model ties
``lm_head`` to it (transformers' ``_tied_weights_keys``), the export's self-verification passes
and the import gives back the same tensors."""

import json

import pytest
import torch

from helpers import perturb_norms_and_dt
from megatron_transmamba.hf import export as E
from megatron_transmamba.hf import weights as W
from megatron_transmamba.training import checkpoint as ckpt

from test_hf import RUN_CONFIG, VOCAB

TIED_RUN_CONFIG = {**RUN_CONFIG, "model": {**RUN_CONFIG["model"],
                                           "share_embeddings_and_output_weights": True}}


@pytest.fixture(scope="module")
def exported(megatron_single_process, tmp_path_factory):
    from megatron_transmamba.models.language_model import TransMambaLanguageModel

    root = tmp_path_factory.mktemp("hf_tied")
    torch.manual_seed(0)
    config = E.model_config_from_run_config(TIED_RUN_CONFIG)
    assert config.share_embeddings_and_output_weights
    model = TransMambaLanguageModel(config, VOCAB).eval()
    perturb_norms_and_dt(model)
    ckpt.save_model_checkpoint(str(root / "train"), 2, model, TIED_RUN_CONFIG)
    summary = E.export_checkpoint(str(root / "train"), str(root / "hf"), tolerance=1e-4)
    return {"root": root, "model": model, "summary": summary, "config": config,
            "hf": E.load_hf_model(str(root / "hf"))}


def test_config_and_weights_hold_the_matrix_once(exported):
    folder = exported["root"] / "hf"
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
    tensors = E.read_safetensors(str(folder))
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors
    assert "output_layer.weight" not in ckpt.tensor_metadata(str(exported["root"] / "train"
                                                                 / "iter_0000002"))


def test_remote_model_ties_lm_head_and_matches_logits(exported):
    hf = exported["hf"]
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    assert torch.equal(hf.lm_head.weight, exported["model"].embedding.word_embeddings.weight)
    assert exported["summary"]["max_abs_logit_diff"] <= 1e-4
    tokens = torch.randint(0, VOCAB, (2, 64))
    with torch.no_grad():
        diff = (exported["model"](tokens) - hf(tokens, use_cache=False).logits).abs().max()
    assert diff.item() <= 1e-4


def test_remote_model_generates_with_the_tied_head(exported):
    out = exported["hf"].generate(torch.randint(0, 256, (1, 8)), max_new_tokens=6,
                                  do_sample=False, min_new_tokens=6, pad_token_id=0)
    assert out.shape == (1, 14)


def test_our_generation_entry_point_matches_the_tied_remote_model(exported):
    from megatron_transmamba.inference.generate import generate
    prompt = torch.randint(0, 256, (1, 20))
    ours = generate(exported["model"], prompt, max_new_tokens=24)
    hf = exported["hf"].generate(prompt, max_new_tokens=24, do_sample=False, min_new_tokens=24,
                                 eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, hf)


def test_import_round_trip_is_tensor_equal(exported, tmp_path):
    path = E.import_hf(str(exported["root"] / "hf"), str(tmp_path / "back"), 1, step=2)
    full, config, run_config, step = E.read_checkpoint(path)
    assert config.share_embeddings_and_output_weights and step == 2
    assert run_config["model"]["share_embeddings_and_output_weights"] is True
    original = {k: v for k, v in exported["model"].state_dict().items() if v is not None}
    assert full.keys() == original.keys() and "output_layer.weight" not in full
    for key, value in original.items():
        assert torch.equal(value, full[key]), key


def test_from_hf_accepts_the_head_under_both_names_only_when_equal(exported):
    hf = E.read_safetensors(str(exported["root"] / "hf"))
    config = exported["config"]
    embedding = hf["model.embed_tokens.weight"]
    full = W.from_hf({**hf, "lm_head.weight": embedding.clone()}, config)
    assert torch.equal(full["embedding.word_embeddings.weight"], embedding)
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        W.from_hf({**hf, "lm_head.weight": embedding + 1}, config)
    untied = E.model_config_from_run_config(RUN_CONFIG)
    with pytest.raises(W.WeightMismatchError, match="lm_head.weight"):
        W.from_hf(hf, untied)                # an untied model needs its own head
