"""Embedded corpus, GPTDataset building and the resumable, DP-sliced data loader."""

import itertools
import os

import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_transmamba.data import embedded_corpus
from megatron_transmamba.data.config import DataConfig
from megatron_transmamba.data.datasets import (
    PretrainingBatchSampler,
    build_data_loader,
    build_pretraining_datasets,
)
from megatron_transmamba.data.embedded_corpus import (
    DEFAULT_BYTE_BUDGET,
    prepare_default_dataset,
    stdlib_root,
    stdlib_source_files,
)
from megatron_transmamba.data.tokenizer import ByteTokenizer

# The first 12 stdlib files in sorted order (_pydecimal.py, 229 kB, comes next): enough
# documents for a 10% validation split.
SMALL_BUDGET = 150_000
SEQ = 63  # not a multiple of anything: samples straddle document boundaries at odd offsets


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    cache = tmp_path_factory.mktemp("corpus")
    return str(cache), prepare_default_dataset(str(cache), byte_budget=SMALL_BUDGET)


def _batches(loader, limit=None):
    return [{k: v.clone() for k, v in batch.items()} for batch in itertools.islice(loader, limit)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_stdlib_selection_is_sorted_budgeted_and_filtered():
    files = stdlib_source_files(SMALL_BUDGET)
    root = stdlib_root()
    relative = [os.path.relpath(f, root).split(os.sep) for f in files]
    assert relative == sorted(relative)
    assert sum(os.path.getsize(f) for f in files) <= SMALL_BUDGET
    assert files == stdlib_source_files(SMALL_BUDGET)

    everything = stdlib_source_files(10**12)
    assert everything[: len(files)] == files  # a budget takes a prefix of one fixed order
    excluded = set(embedded_corpus.EXCLUDED_DIRS)
    for path in everything:
        parts = os.path.relpath(path, root).split(os.sep)
        assert path.endswith(".py") and not excluded.intersection(parts[:-1]), path
    assert len(stdlib_source_files(1)) == 1  # never empty


def test_prepare_default_dataset_is_reused_and_rebuilt_when_incomplete(small_corpus):
    cache, prefix = small_corpus
    assert os.path.basename(prefix) == f"stdlib_byte-{SMALL_BUDGET}_text_document"
    files = stdlib_source_files(SMALL_BUDGET)
    dataset = IndexedDataset(prefix)
    with open(files[0], encoding="utf-8") as f:
        first = f.read().encode("utf-8")
    assert list(dataset[0]) == list(first) + [ByteTokenizer.EOD_ID]
    assert len(dataset) >= 10

    stamp = os.stat(prefix + ".bin").st_mtime_ns
    assert prepare_default_dataset(cache, byte_budget=SMALL_BUDGET) == prefix
    assert os.stat(prefix + ".bin").st_mtime_ns == stamp  # reused, not rewritten

    os.remove(prefix + ".json")  # as if a writer died before finishing
    assert prepare_default_dataset(cache, byte_budget=SMALL_BUDGET) == prefix
    assert os.path.isfile(prefix + ".json")
    assert not [n for n in os.listdir(cache) if ".tmp-" in n]


def _build(cache_dir, data_path, seed=1234, split="90,10,0", num_samples=(200, 10, 0)):
    cfg = DataConfig(data_path=data_path, cache_dir=cache_dir, split=split)
    return build_pretraining_datasets(cfg, ByteTokenizer(), SEQ, num_samples, seed)


def test_samples_are_packed_shifted_and_deterministic(small_corpus, tmp_path):
    _, prefix = small_corpus
    train, valid, test = _build(str(tmp_path / "a"), [prefix])
    assert test is None and len(train) >= 200 and len(valid) >= 10

    batch = next(iter(build_data_loader(train, 0, 4, 0, 1, 0)))
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
    for key, dtype in [("tokens", torch.int64), ("labels", torch.int64),
                       ("position_ids", torch.int64), ("loss_mask", torch.float32)]:
        assert batch[key].dtype == dtype and batch[key].shape == (4, SEQ), key
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    assert torch.equal(batch["position_ids"], torch.arange(SEQ).expand(4, SEQ))
    assert bool((batch["loss_mask"] == 1).all())
    assert int(batch["tokens"].max()) <= ByteTokenizer.EOD_ID

    # a fresh cache directory (indices rebuilt) and the warm one (indices loaded) agree
    again_cold = _build(str(tmp_path / "b"), [prefix])[0]
    again_warm = _build(str(tmp_path / "a"), [prefix])[0]
    for other in (again_cold, again_warm):
        _assert_same_batches([batch], [next(iter(build_data_loader(other, 0, 4, 0, 1, 0)))])
    reseeded = _build(str(tmp_path / "c"), [prefix], seed=99)[0]
    assert not torch.equal(next(iter(build_data_loader(reseeded, 0, 4, 0, 1, 0)))["tokens"],
                           batch["tokens"])


@pytest.mark.parametrize("dp_size, micro_batch", [(1, 3), (2, 2), (3, 1)])
def test_resume_continues_exactly_where_a_fresh_loader_is(
    small_corpus, tmp_path, dp_size, micro_batch
):
    _, prefix = small_corpus
    train = _build(str(tmp_path), [prefix])[0]
    global_micro = dp_size * micro_batch
    consumed = 5 * global_micro
    for rank in range(dp_size):
        fresh_loader = build_data_loader(train, 0, micro_batch, rank, dp_size, 0)
        resumed_loader = build_data_loader(train, consumed, micro_batch, rank, dp_size, 0)
        assert len(fresh_loader) == len(train) // global_micro
        assert len(resumed_loader) == len(fresh_loader) - 5
        _assert_same_batches(_batches(fresh_loader, 25)[5:], _batches(resumed_loader, 20))


def test_dp_rank_slices_partition_the_global_batch(small_corpus, tmp_path):
    _, prefix = small_corpus
    train = _build(str(tmp_path), [prefix])[0]
    whole = _batches(build_data_loader(train, 12, 6, 0, 1, 0), 30)
    ranks = [_batches(build_data_loader(train, 12, 2, r, 3, 0), 30) for r in range(3)]
    assert all(len(r) == len(whole) == 30 for r in ranks)
    for step, batch in enumerate(whole):
        for key in batch:
            parts = torch.cat([ranks[r][step][key] for r in range(3)])
            assert torch.equal(parts, batch[key]), (step, key)


def test_worker_processes_give_the_same_batches(small_corpus, tmp_path):
    _, prefix = small_corpus
    train = _build(str(tmp_path), [prefix], num_samples=(40, 10, 0))[0]
    in_process = _batches(build_data_loader(train, 4, 2, 1, 2, 0))[:6]
    workers = _batches(build_data_loader(train, 4, 2, 1, 2, 2))[:6]
    _assert_same_batches(in_process, workers)


def test_sampler_rejects_misaligned_or_exhausted_resume():
    with pytest.raises(ValueError, match="multiple of"):
        PretrainingBatchSampler(100, 3, 2, 0, 2)
    with pytest.raises(ValueError, match="exhausted"):
        PretrainingBatchSampler(100, 100, 2, 0, 2)
    with pytest.raises(ValueError, match="data_parallel_rank"):
        PretrainingBatchSampler(100, 0, 2, 2, 2)
    assert list(PretrainingBatchSampler(10, 4, 2, 1, 2)) == [[6, 7]]  # the tail [8, 9] is dropped
    assert build_data_loader(None, 0, 1, 0, 1, 0) is None


def test_weighted_blend_without_torch_distributed(small_corpus, tmp_path):
    _, prefix = small_corpus
    other = str(tmp_path / "other")
    from megatron_transmamba.data.preprocess import build_indexed_dataset

    build_indexed_dataset([f"document {i} " * 40 for i in range(30)], ByteTokenizer(), other)
    assert not torch.distributed.is_initialized()
    train, valid, _ = _build(str(tmp_path / "cache"), ["0.25", prefix, "0.75", other],
                             num_samples=(100, 8, 0))
    assert len(train) == 100 and len(valid) >= 8
    ids = torch.cat([b["dataset_id"] for b in build_data_loader(train, 0, 10, 0, 1, 0)])
    assert 15 <= int((ids == 0).sum()) <= 35  # about a quarter from the first dataset


def test_default_corpus_when_data_path_is_none(tmp_path):
    train, valid, test = _build(str(tmp_path), None, split="98,2,0", num_samples=(16, 4, 0))
    prefix = tmp_path / "stdlib_byte_text_document"
    assert (tmp_path / "stdlib_byte_text_document.json").is_file()
    total = sum(os.path.getsize(f) for f in stdlib_source_files())
    assert 0.9 * DEFAULT_BYTE_BUDGET < total <= DEFAULT_BYTE_BUDGET
    dataset = IndexedDataset(str(prefix))
    assert int(dataset.sequence_lengths.sum()) == total + len(dataset)  # bytes + one EOD each
    assert test is None and len(train) > 16 and len(valid) >= 4


def test_errors_name_the_field(small_corpus, tmp_path):
    _, prefix = small_corpus
    with pytest.raises(ValueError, match=r"data\.data_path.*missing"):
        _build(str(tmp_path), [str(tmp_path / "missing")])
    # megatron-core would loop forever looking for tokens in an empty split
    with pytest.raises(ValueError, match=r"data\.split.*test split none of the 12 documents"):
        _build(str(tmp_path), [prefix], split="90,10,1")


def test_rebuilt_dataset_gets_fresh_sample_indices(tmp_path):
    """megatron-core keys its cached indices by path and settings only: a dataset rebuilt with
    fewer documents under the same prefix must not reuse indices that point past them."""
    import time
    from megatron_transmamba.data.preprocess import build_indexed_dataset
    prefix = str(tmp_path / "corpus")
    build_indexed_dataset([f"long document {i} " * 60 for i in range(40)], ByteTokenizer(), prefix)
    first, _, _ = _build(str(tmp_path / "cache"), [prefix], split="100,0,0", num_samples=(300, 0, 0))
    [first[i] for i in range(len(first))]
    time.sleep(0.01)                                   # a distinct modification time
    build_indexed_dataset([f"short {i} " * 30 for i in range(6)], ByteTokenizer(), prefix)
    second, _, _ = _build(str(tmp_path / "cache"), [prefix], split="100,0,0", num_samples=(300, 0, 0))
    for i in range(len(second)):                       # raised IndexError with the stale indices
        assert second[i]["tokens"].shape == (SEQ,)
    assert len(os.listdir(tmp_path / "cache" / "gpt_indices")) == 2
