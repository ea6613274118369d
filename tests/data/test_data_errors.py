"""Bad datasets in data.data_path: one-line errors naming the file, before anything is written."""

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
from megatron.core.datasets import indexed_dataset
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_transmamba.data import indexed_files
from megatron_transmamba.data.config import DataConfig
from megatron_transmamba.data.datasets import build_pretraining_datasets
from megatron_transmamba.data.indexed_files import check_indexed_dataset
from megatron_transmamba.data.tokenizer import ByteTokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
LENGTHS = (5, 1, 9, 7)  # 22 tokens in 4 documents


def _write(prefix, dtype=numpy.uint16, max_id=256, lengths=LENGTHS):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for i, n in enumerate(lengths):
        tokens = (numpy.arange(n) * 37 + i) % 256
        tokens[-1] = max_id if i == len(lengths) - 1 else 256
        builder.add_document(numpy.asarray(tokens, dtype=dtype), [n])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def _patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _missing(p):
    return str(p) + "_absent"


def _bin_missing(p):
    os.remove(p + ".bin")
    return p


def _given_with_suffix(p):
    return p + ".bin"


def _empty_files(p):
    open(p + ".bin", "wb").close()
    open(p + ".idx", "wb").close()
    return p


def _truncated_idx(p):
    idx = Path(p + ".idx")
    idx.write_bytes(idx.read_bytes()[:60])
    return p


def _wrong_magic(p):
    _patch(Path(p + ".idx"), 0, b"NOTANIDX!")
    return p


def _text_idx(p):
    Path(p + ".idx").write_text("not an index\n")
    return p


def _wrong_version(p):
    _patch(Path(p + ".idx"), 9, struct.pack("<Q", 2))
    return p


def _float_dtype(p):
    _patch(Path(p + ".idx"), 17, bytes([6]))  # float64
    return p


def _short_bin(p):
    data = Path(p + ".bin")
    data.write_bytes(data.read_bytes()[:-2])
    return p


def _long_bin(p):
    with open(p + ".bin", "ab") as f:
        f.write(b"\0" * 8)
    return p


def _bad_pointer(p):
    _patch(Path(p + ".idx"), 34 + 4 * len(LENGTHS) + 8 * 2, struct.pack("<q", 4))
    return p


def _other_bin(p):
    _write(p + "_other", lengths=(3, 3))
    os.replace(p + "_other.bin", p + ".bin")
    return p


CASES = {
    "missing": (_missing, r"_absent\.bin and .*_absent\.idx not found; expected an indexed"),
    "bin missing": (_bin_missing, r"d\.bin not found; expected an indexed dataset .*d\.bin \+ \.idx"),
    "suffix given": (_given_with_suffix, r"give the prefix '.*d', without \.bin/\.idx"),
    "empty": (_empty_files, r"d\.idx is empty; expected a megatron-core index"),
    "truncated idx": (_truncated_idx, r"d\.idx has 60 bytes; expected 122 for .* 4 sequences and 5 documents"),
    "wrong magic": (_wrong_magic, r"d\.idx starts with b'NOTANIDX!'; expected a megatron-core"),
    "text idx": (_text_idx, r"d\.idx starts with b'not an in'; expected a megatron-core"),
    "version": (_wrong_version, r"d\.idx: index version 2; expected 1"),
    "float dtype": (_float_dtype, r"d\.idx: token dtype code 6; expected an integer dtype"),
    "short bin": (_short_bin, r"d\.bin has 42 bytes; expected 44 \(22 tokens of uint16"),
    "long bin": (_long_bin, r"d\.bin has 52 bytes; expected 44 "),
    "other bin": (_other_bin, r"d\.bin has 12 bytes; expected 44 .*different datasets"),
    "bad pointer": (_bad_pointer, r"d\.idx: sequence 2 has length 9 at byte 4; expected"),
}


def _assert_one_line_error(cfg, pattern, tmp_path):
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=r"^data\.data_path: .*" + pattern) as error:
        cfg.validate()
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=pattern):
        build_pretraining_datasets(cfg, ByteTokenizer(), 8, (10, 0, 0), 1)
    assert sorted(os.listdir(tmp_path)) == before  # no cache_dir, nothing else


@pytest.mark.parametrize("case", list(CASES))
def test_bad_files_get_one_line_naming_the_file(case, tmp_path):
    damage, pattern = CASES[case]
    prefix = damage(_write(tmp_path / "d"))
    _assert_one_line_error(DataConfig(data_path=[prefix], cache_dir=str(tmp_path / "cache")),
                           pattern, tmp_path)


@pytest.mark.parametrize("dtype, token, seen", [(numpy.uint16, 300, 300), (numpy.int32, -3, -3)])
def test_token_ids_outside_the_vocabulary(dtype, token, seen, tmp_path):
    prefix = _write(tmp_path / "d", dtype=dtype, max_id=token)
    cfg = DataConfig(data_path=["1", prefix], cache_dir=str(tmp_path / "cache"))
    # the last token of the last document, 21 of 22
    _assert_one_line_error(cfg, rf"d\.bin holds token id {seen} \(token 21\); expected ids in "
                                r"\[0, 257\), the tokenizer's vocabulary", tmp_path)


def test_dataset_without_tokens(tmp_path):
    prefix = _write(tmp_path / "d", lengths=())
    cfg = DataConfig(data_path=[prefix], cache_dir=str(tmp_path / "cache"))
    _assert_one_line_error(cfg, r"d\.idx holds no tokens; expected at least one document",
                           tmp_path)


def test_token_scan_chunks_skips_and_remembers(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed_files, "_CHUNK", 4)  # ids found across chunk boundaries
    for max_id in (256, 257):
        prefix = _write(tmp_path / f"ok{max_id}", max_id=max_id)
        check_indexed_dataset(prefix, vocab_size=max_id + 1)
    prefix = _write(tmp_path / "bad", max_id=257)
    with pytest.raises(indexed_files.DatasetFileError, match=r"token id 257 \(token 21\)"):
        check_indexed_dataset(prefix, vocab_size=257)

    scans, memmap = [], numpy.memmap

    def spy(path, *args, **kwargs):
        if kwargs.get("dtype") is not numpy.uint8:  # not the index: a token scan
            scans.append(path)
        return memmap(path, *args, **kwargs)

    monkeypatch.setattr(numpy, "memmap", spy)
    check_indexed_dataset(str(tmp_path / "ok256"), vocab_size=257)  # remembered: no scan
    check_indexed_dataset(_write(tmp_path / "bytes", dtype=numpy.uint8, max_id=255), 257)
    assert scans == []  # uint8 cannot hold an id >= 257: no scan either
    check_indexed_dataset(str(tmp_path / "ok256"), vocab_size=300)  # another vocabulary
    assert scans == [str(tmp_path / "ok256.bin")]


def test_index_layout_is_megatron_cores():
    assert indexed_files.INDEX_MAGIC == indexed_dataset._INDEX_HEADER
    assert indexed_files._HEADER.size == 34  # megatron's offset after the header


def test_command_line_prints_one_line_and_creates_nothing(tmp_path):
    prefix = _write(tmp_path / "d", max_id=300)
    save, cache = tmp_path / "ckpt", tmp_path / "cache"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "examples/pretrain.py", "--config", "examples/configs/tiny_cpu.yaml",
         f"--data.data_path=[{prefix}]", f"--data.cache_dir={cache}",
         f"--checkpoint.save={save}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert lines == [f"error (rank 0): data.data_path: {prefix}.bin holds token id 300 "
                     "(token 21); expected ids in [0, 257), the tokenizer's vocabulary: was the "
                     "dataset made with another tokenizer?"], result.stderr
    assert not save.exists() and not cache.exists()
