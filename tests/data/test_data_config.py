"""DataConfig: defaults, validation errors naming ``data.<field>``, data_path blends."""

import dataclasses

import pytest

from megatron_transmamba.data.config import DataConfig, parse_data_path


def test_fields_and_defaults_are_frozen():
    fields = {f.name: f.default for f in dataclasses.fields(DataConfig)}
    assert fields == {
        "data_path": None,
        "valid_data_path": None,
        "valid_seed": None,
        "tokenizer": "byte",
        "tokenizer_path": None,
        "split": "98,2,0",
        "cache_dir": ".cache/megatron_transmamba",
        "num_workers": 0,
        "reset_at_eod": False,
    }
    DataConfig().validate()


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"data_path": "a"}, "data.data_path"),
        ({"data_path": []}, "data.data_path"),
        ({"data_path": ["0.5", "a", "b", "c"]}, "data.data_path"),
        ({"data_path": ["0.5", "a", "-1", "b"]}, "data.data_path"),
        ({"data_path": ["0", "a", "0", "b"]}, "data.data_path"),
        ({"tokenizer": "gpt2"}, "data.tokenizer"),
        ({"tokenizer": "hf"}, "data.tokenizer_path"),
        ({"tokenizer_path": "t.json"}, "data.tokenizer_path"),
        ({"split": "98,2,0,1"}, "data.split"),
        ({"split": "a,b"}, "data.split"),
        ({"split": "0,1,0"}, "data.split"),
        ({"split": "-1,2"}, "data.split"),
        ({"cache_dir": ""}, "data.cache_dir"),
        ({"num_workers": -1}, "data.num_workers"),
    ],
)
def test_validate_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        DataConfig(**changes).validate()


def test_valid_variants():
    # files=False: the fields only (the files: test_data_errors.py)
    DataConfig(data_path=["a"], split="100").validate(files=False)
    DataConfig(data_path=["a", "b"], split="90, 10").validate(files=False)
    DataConfig(tokenizer="hf", tokenizer_path="tok.json", split="99.5,0.5,0").validate()


def test_parse_data_path():
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)
    assert parse_data_path(["0.7", "a", "0.3", " b"]) == (["a", "b"], [0.7, 0.3])
    assert parse_data_path(["x"]) == (["x"], None)
    assert DataConfig(data_path=["2", "p", "1", "q"]).blend() == (["p", "q"], [2.0, 1.0])
    assert DataConfig().blend() is None
