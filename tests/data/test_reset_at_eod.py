"""``data.reset_at_eod``: samples split after every EOD token, positions restarting there, and
``cu_seqlens`` in every micro-batch; with the option off the batches are those of before."""

import pytest
import torch

from helpers import short_documents_corpus
from megatron_transmamba.data.config import DataConfig
from megatron_transmamba.data.datasets import build_data_loader, build_pretraining_datasets
from megatron_transmamba.data.tokenizer import ByteTokenizer

SEQ = 40


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory):
    """Documents of 1 to 30 bytes, so most samples hold several EOD tokens."""
    prefix = str(tmp_path_factory.mktemp("short") / "short")
    return short_documents_corpus(prefix, "abcdef ", 30, 400)


def batches(prefix, cache_dir, reset_at_eod, micro_batch=3, count=4):
    cfg = DataConfig(data_path=[prefix], cache_dir=cache_dir, split="90,10,0",
                     reset_at_eod=reset_at_eod)
    train = build_pretraining_datasets(cfg, ByteTokenizer(), SEQ, (40, 4, 0), seed=5)[0]
    loader = build_data_loader(train, 0, micro_batch, 0, 1, 0)
    return [batch for batch, _ in zip(loader, range(count))]


def test_micro_batches_carry_document_boundaries_after_each_eod(short_documents, tmp_path):
    plain = batches(short_documents, str(tmp_path), False)
    packed = batches(short_documents, str(tmp_path), True)
    eod = ByteTokenizer.EOD_ID
    for before, batch in zip(plain, packed):
        assert "cu_seqlens" not in before
        assert torch.equal(before["position_ids"], torch.arange(SEQ).expand(3, SEQ))
        for key in ("tokens", "labels", "loss_mask"):          # only the boundaries are new
            assert torch.equal(before[key], batch[key]), key
        tokens = batch["tokens"]
        # a document starts at each row start and right after each EOD token (not past the row)
        starts = [row * SEQ + t for row in range(3) for t in range(SEQ)
                  if t == 0 or tokens[row, t - 1] == eod]
        assert batch["cu_seqlens"].dtype == torch.int32
        assert batch["cu_seqlens"].tolist() == starts + [3 * SEQ]
        positions = batch["position_ids"].reshape(-1)
        for start, end in zip(starts, starts[1:] + [3 * SEQ]):
            assert positions[start:end].tolist() == list(range(end - start))
    assert sum(len(b["cu_seqlens"]) - 1 for b in packed) > 3 * len(packed) * 2   # really packed


def test_reset_at_eod_must_be_a_bool():
    with pytest.raises(ValueError, match=r"data\.reset_at_eod"):
        DataConfig(reset_at_eod="yes").validate()
