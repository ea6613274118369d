"""tools/data/preprocess_data.py: txt/jsonl -> indexed dataset, read back with megatron-core."""

import importlib.util
import json
import pathlib

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_transmamba.data.preprocess import build_indexed_dataset, dataset_is_complete
from megatron_transmamba.data.tokenizer import ByteTokenizer, build_tokenizer

_TOOL = pathlib.Path(__file__).resolve().parents[2] / "tools" / "data" / "preprocess_data.py"
_spec = importlib.util.spec_from_file_location("preprocess_data", _TOOL)
preprocess_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(preprocess_data)

EOD = ByteTokenizer.EOD_ID


def _read_documents(prefix):
    dataset = IndexedDataset(str(prefix))
    assert len(dataset.document_indices) == len(dataset) + 1  # one sequence per document
    return [list(dataset[i]) for i in range(len(dataset))]


def _bytes_then_eod(text):
    return list(text.encode("utf-8")) + [EOD]


def test_txt_one_document_per_file(tmp_path, capsys):
    texts = ["first file\nline two\n", "zweite Datei: äöü ✓"]
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(text, encoding="utf-8")
    prefix = tmp_path / "out" / "docs"
    argv = ["--input", str(tmp_path / "*.txt"), "--output-prefix", str(prefix)]
    assert preprocess_data.main(argv) == 0
    assert _read_documents(prefix) == [_bytes_then_eod(t) for t in texts]
    assert IndexedDataset(str(prefix)).index.dtype == numpy.uint16
    out = capsys.readouterr().out
    assert "2 documents" in out and f"{sum(len(t.encode()) + 1 for t in texts)} tokens" in out
    # only the final files remain: temporary names were moved into place
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["docs.bin", "docs.idx"]


def test_txt_split_lines_skips_blank_lines(tmp_path):
    (tmp_path / "lines.txt").write_text("alpha\n\n  \nbeta\ngamma", encoding="utf-8")
    prefix = tmp_path / "lines"
    preprocess_data.main(
        ["--input", str(tmp_path / "lines.txt"), "--output-prefix", str(prefix), "--split-lines"]
    )
    assert _read_documents(prefix) == [_bytes_then_eod(t) for t in ["alpha", "beta", "gamma"]]


def test_jsonl_one_document_per_line(tmp_path):
    records = [{"text": "one", "id": 1}, {"content": "x", "text": "twö\nlines"}, {"text": "three"}]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    prefix = tmp_path / "jsonl"
    preprocess_data.main(["--input", str(path), "--output-prefix", str(prefix)])
    assert _read_documents(prefix) == [_bytes_then_eod(r["text"]) for r in records]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"text": "ok"', "invalid JSON"),
        ('{"body": "no text key"}', "no key 'text'"),
        ("[1, 2]", "no key 'text'"),
        ('{"text": 3}', "'text' is not a string"),
        ('{"text": "caf\xe9"}', "not UTF-8"),  # a latin-1 byte
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    lines = [b'{"text": "fine"}', b"", bad_line.encode("latin-1"), b'{"text": "after"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    prefix = tmp_path / "bad"
    with pytest.raises(ValueError, match=f"bad.jsonl:3: {message}") as error:
        preprocess_data.main(["--input", str(path), "--output-prefix", str(prefix)])
    assert str(path) in str(error.value)
    # the failed run leaves nothing behind, not even temporary files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_failed_rewrite_keeps_the_previous_dataset(tmp_path):
    prefix = str(tmp_path / "keep")
    build_indexed_dataset(["old"], ByteTokenizer(), prefix)

    def documents():
        yield "new"
        raise RuntimeError("reader died")

    with pytest.raises(RuntimeError):
        build_indexed_dataset(documents(), ByteTokenizer(), prefix)
    assert _read_documents(prefix) == [_bytes_then_eod("old")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.bin", "keep.idx"]


def test_dataset_is_complete_detects_truncation(tmp_path):
    prefix = tmp_path / "d"
    stats = build_indexed_dataset(["abc", "", "de"], ByteTokenizer(), str(prefix))
    assert (stats.documents, stats.tokens, stats.skipped) == (2, 7, 1)
    assert dataset_is_complete(str(prefix))
    data = (tmp_path / "d.bin").read_bytes()
    (tmp_path / "d.bin").write_bytes(data[:-2])
    assert not dataset_is_complete(str(prefix))
    (tmp_path / "d.idx").write_bytes(b"MMIDIDX\x00\x00")
    assert not dataset_is_complete(str(prefix))
    assert not dataset_is_complete(str(tmp_path / "absent"))


def test_inputs_that_match_nothing_or_are_unsupported(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        preprocess_data.main(["--input", str(tmp_path / "*.txt"), "--output-prefix", "x"])
    (tmp_path / "a.csv").write_text("a,b")
    with pytest.raises(ValueError, match="a.csv: unsupported"):
        preprocess_data.main(["--input", str(tmp_path / "a.csv"), "--output-prefix", "x"])
    with pytest.raises(ValueError, match="no non-empty document"):
        build_indexed_dataset(["", ""], ByteTokenizer(), str(tmp_path / "empty"))


def test_train_bpe_writes_tokenizer_beside_output(tmp_path, capsys):
    lines = [f"sample {i}: the model reads text and predicts the next token" for i in range(50)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in lines), encoding="utf-8")
    prefix = tmp_path / "out" / "bpe"
    preprocess_data.main(
        ["--input", str(path), "--output-prefix", str(prefix), "--tokenizer", "train-bpe",
         "--vocab-size", "320"]
    )
    tokenizer_path = tmp_path / "out" / "bpe.tokenizer.json"
    assert "wrote" in capsys.readouterr().out and tokenizer_path.is_file()
    tokenizer = build_tokenizer("hf", str(tokenizer_path))
    documents = _read_documents(prefix)
    assert len(documents) == len(lines)
    for text, ids in zip(lines, documents):
        assert ids[-1] == tokenizer.eod and tokenizer.eod not in ids[:-1]
        assert tokenizer.detokenize(ids) == text
        assert len(ids) < len(text)  # merges learnt on the documents, not on the JSON syntax

    # the trained tokenizer then preprocesses through --tokenizer hf to the same ids
    prefix_hf = tmp_path / "out" / "hf"
    preprocess_data.main(
        ["--input", str(path), "--output-prefix", str(prefix_hf), "--tokenizer", "hf",
         "--tokenizer-path", str(tokenizer_path)]
    )
    assert _read_documents(prefix_hf) == documents
