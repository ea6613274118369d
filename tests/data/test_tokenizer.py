"""Byte and HF tokenizers: round trips, special ids, errors naming the config field."""

import numpy
import pytest

from megatron_transmamba.data.tokenizer import (
    EOD_TOKEN,
    ByteTokenizer,
    HFTokenizer,
    build_tokenizer,
    train_bpe_tokenizer,
)

TEXTS = ["", "a", "hello world\n", "héllo wörld — 日本語 🚀\ttab", "def f(x):\n    return x**2\n"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.tokenize(text)
    assert ids.dtype == numpy.int64
    assert list(ids) == list(text.encode("utf-8"))
    assert tokenizer.detokenize(ids) == text


def test_byte_special_ids():
    tokenizer = ByteTokenizer()
    assert tokenizer.vocab_size == 257 and tokenizer.eod == 256
    assert len(tokenizer.vocab) == 257 and tokenizer.inv_vocab[256] == EOD_TOKEN
    assert tokenizer.pad == -1  # no pad in the vocab: GPTDataset pads with an id no data holds
    assert tokenizer.detokenize([104, 105, 256, -1, 33]) == "hi!"
    # a cut multi-byte character decodes to U+FFFD instead of raising
    assert tokenizer.detokenize(list("é".encode())[:1]) == "\ufffd"
    assert tokenizer.unique_identifiers["cls"] == "ByteTokenizer"


def test_build_tokenizer_errors_name_fields(tmp_path):
    assert isinstance(build_tokenizer("byte", None), ByteTokenizer)
    with pytest.raises(ValueError, match="data.tokenizer="):
        build_tokenizer("sentencepiece", None)
    with pytest.raises(ValueError, match="data.tokenizer_path"):
        build_tokenizer("hf", None)
    with pytest.raises(ValueError, match="data.tokenizer_path.*no such file"):
        build_tokenizer("hf", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="data.tokenizer_path"):
        build_tokenizer("byte", str(tmp_path / "tokenizer.json"))


def test_bpe_training_round_trip(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "the quick brown fox jumps over the lazy dog\n" * 20
        + "def forward(self, x):\n    return self.proj(x)\n" * 20,
        encoding="utf-8",
    )
    output = tmp_path / "tok" / "tokenizer.json"
    tokenizer = train_bpe_tokenizer([str(corpus)], vocab_size=300, output_path=str(output))
    assert isinstance(tokenizer, HFTokenizer) and output.is_file()
    assert [p.name for p in output.parent.iterdir()] == ["tokenizer.json"]  # no temp files left
    assert 257 < tokenizer.vocab_size <= 300
    assert tokenizer.eod == tokenizer.vocab[EOD_TOKEN]

    for text in ["the lazy fox", "unseen: héllo 日本 🚀 \n\n  spaces", ""]:
        ids = tokenizer.tokenize(text)
        assert ids.dtype == numpy.int64
        assert tokenizer.detokenize(ids) == text
    # merges were learnt: common text is shorter than its bytes
    assert len(tokenizer.tokenize("the quick brown fox")) < len("the quick brown fox")
    assert tokenizer.detokenize([*tokenizer.tokenize("ab"), tokenizer.eod]) == "ab"

    reloaded = build_tokenizer("hf", str(output))
    assert reloaded.unique_identifiers == tokenizer.unique_identifiers
    assert [list(a) for a in reloaded.tokenize_batch(["x y", "the"])] == [
        list(tokenizer.tokenize("x y")),
        list(tokenizer.tokenize("the")),
    ]


def test_bpe_rejects_vocab_below_byte_alphabet(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abc")
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe_tokenizer([str(corpus)], 100, str(tmp_path / "t.json"))


def test_hf_tokenizer_without_eod_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    with pytest.raises(ValueError, match=r"<\|endoftext\|>"):
        build_tokenizer("hf", str(path))
