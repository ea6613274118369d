"""``data.valid_data_path``: validation from its own datasets (megatron's --valid-data-path),
training from all of ``data.data_path``; bad values and files are one line naming the field."""

import os

import numpy
import pytest
import yaml
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_transmamba.data.config import DataConfig
from megatron_transmamba.data.datasets import build_data_loader, build_pretraining_datasets
from megatron_transmamba.data.tokenizer import ByteTokenizer
from megatron_transmamba.training.config import build_run_config, load_run_config


def _write(prefix, low, high, documents=6, length=40):
    """Documents of token ids in [low, high) only, each ending with EOD (256)."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.uint16)
    for i in range(documents):
        tokens = low + (numpy.arange(length) * 7 + i) % (high - low)
        tokens[-1] = 256
        builder.add_document(numpy.asarray(tokens, dtype=numpy.uint16), [length])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def _tokens(dataset, count):
    loader = build_data_loader(dataset, 0, 2, 0, 1, 0)
    seen = set()
    for i, batch in enumerate(loader):
        if i == count:
            break
        seen |= set(batch["tokens"].flatten().tolist()) | set(batch["labels"].flatten().tolist())
    return seen - {256}


def test_train_and_validation_come_from_their_own_datasets(tmp_path):
    train = _write(tmp_path / "train", 0, 100)
    valid = _write(tmp_path / "valid", 100, 200, documents=3)
    cfg = DataConfig(data_path=[train], valid_data_path=[valid], split="50,50,0",
                     cache_dir=str(tmp_path / "cache"))
    cfg.validate()
    assert cfg.valid_blend() == ([valid], None)
    train_ds, valid_ds, test_ds = build_pretraining_datasets(cfg, ByteTokenizer(), 16, (40, 12, 0), 3)
    assert test_ds is None
    assert len(train_ds) >= 40 and len(valid_ds) >= 12
    assert max(_tokens(train_ds, 20)) < 100                # every train document (split unused)
    assert min(_tokens(valid_ds, 6)) >= 100
    # all 6 train documents reach training: data.split does not hold any back
    assert _tokens(train_ds, 20) == set(range(100))


def test_weighted_validation_blend(tmp_path):
    train = _write(tmp_path / "train", 0, 100)
    a, b = _write(tmp_path / "a", 100, 150), _write(tmp_path / "b", 150, 200)
    cfg = DataConfig(data_path=[train], valid_data_path=["1", a, "1", b],
                     cache_dir=str(tmp_path / "cache"))
    _, valid_ds, _ = build_pretraining_datasets(cfg, ByteTokenizer(), 16, (8, 16, 0), 3)
    seen = _tokens(valid_ds, 8)
    assert min(seen) >= 100 and max(seen) >= 150 and min(seen) < 150


def _first_batches(dataset, count=3):
    loader = build_data_loader(dataset, 0, 2, 0, 1, 0)
    return [batch["tokens"].clone() for _, batch in zip(range(count), loader)]


def test_valid_seed_fixes_the_validation_batches_across_training_seeds(tmp_path):
    train = _write(tmp_path / "train", 0, 100, documents=20)
    valid = _write(tmp_path / "valid", 100, 200, documents=20)

    def build(seed, valid_seed):
        cfg = DataConfig(data_path=[train], valid_data_path=[valid], valid_seed=valid_seed,
                         cache_dir=str(tmp_path / "cache"))
        train_ds, valid_ds, _ = build_pretraining_datasets(cfg, ByteTokenizer(), 16, (12, 12, 0), seed)
        return _first_batches(train_ds), _first_batches(valid_ds)

    train_1, valid_1 = build(1, 7)
    train_2, valid_2 = build(2, 7)
    assert not all(a.equal(b) for a, b in zip(train_1, train_2))     # training follows the seed
    assert all(a.equal(b) for a, b in zip(valid_1, valid_2))         # validation does not
    _, own_1 = build(1, None)                                        # default: the training seed
    _, own_2 = build(2, None)
    assert not all(a.equal(b) for a, b in zip(own_1, own_2))
    assert all(a.equal(b) for a, b in zip(build(7, None)[1], valid_1))


@pytest.mark.parametrize("changes, message", [
    ({"valid_seed": 3}, r"^data\.valid_seed needs data\.valid_data_path"),
    ({"data_path": ["t"], "valid_data_path": ["v"], "valid_seed": True},
     r"^data\.valid_seed=True: expected an integer or None"),
    ({"valid_data_path": ["v"]}, r"^data\.valid_data_path needs data\.data_path"),
    ({"data_path": ["t"], "valid_data_path": "v"}, r"^data\.valid_data_path='v': must be a list"),
    ({"data_path": ["t"], "valid_data_path": []}, r"^data\.valid_data_path=\[\]: needs"),
    ({"data_path": ["t"], "valid_data_path": ["0.5", "a", "b", "c"]},
     r"^data\.valid_data_path=.*either only prefixes"),
])
def test_bad_values_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**changes).validate(files=False)


def test_missing_or_foreign_validation_files_are_one_line(tmp_path):
    train = _write(tmp_path / "train", 0, 100)
    missing = str(tmp_path / "absent")
    cfg = DataConfig(data_path=[train], valid_data_path=[missing], cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError) as error:
        cfg.validate()
    assert str(error.value) == (f"data.valid_data_path: {missing}.bin and {missing}.idx not found; "
                                f"expected an indexed dataset {missing}.bin + .idx made by "
                                "tools/data/preprocess_data.py")
    wide = str(tmp_path / "wide")
    builder = IndexedDatasetBuilder(f"{wide}.bin", dtype=numpy.uint16)
    builder.add_document(numpy.array([1, 300], dtype=numpy.uint16), [2])
    builder.finalize(f"{wide}.idx")
    with pytest.raises(ValueError, match=r"^data\.valid_data_path: .*wide\.bin holds token id 300") \
            as error:
        DataConfig(data_path=[train], valid_data_path=[wide]).validate()
    assert "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "c")


def test_run_config_takes_a_single_prefix_and_overrides(tmp_path):
    train = _write(tmp_path / "train", 0, 100)
    valid = _write(tmp_path / "valid", 100, 200)
    cfg = build_run_config({"data": {"data_path": train, "valid_data_path": valid}})
    assert cfg.data.data_path == [train] and cfg.data.valid_data_path == [valid]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": {"data_path": [train]}}))
    cfg = load_run_config(str(path), [f"--data.valid_data_path=[{valid}]"])
    assert cfg.data.valid_data_path == [valid]
    with pytest.raises(ValueError, match=r"^data\.valid_data_path: .*absent\.bin"):
        load_run_config(str(path), [f"--data.valid_data_path={tmp_path / 'absent'}"])
