"""The code corpus builder on a fake site-packages tree: files found and skipped, duplicates
removed, whole packages on one side of the split, the manifest, identical output for identical
input, and one-line errors naming the path before anything is written."""

import hashlib
import json
import os
import runpy
import sys
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_transmamba.data import code_corpus
from megatron_transmamba.data.code_corpus import (
    CorpusError,
    build_code_corpus,
    find_source_files,
    package_of,
    split_by_package,
    validation_packages,
    validation_score,
)
from megatron_transmamba.data.tokenizer import ByteTokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = "def shared():\n    return 'the same bytes in two packages'\n"


def _source(package, index, lines=3):
    return "".join(f"# {package} file {index} line {i}\nx_{i} = {i * index}\n" for i in range(lines))


def _fake_site_packages(root: Path) -> dict:
    """Two site-packages folders: 8 packages, a top-level module, a duplicate across packages
    and one across folders, plus what must be skipped. Returns what the corpus must hold."""
    first, second = root / "site-a", root / "site-b"
    expected = {}
    for n, package in enumerate(["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]):
        for i in range(2 + n % 3):
            path = first / package / ("sub" if i == 2 else "") / f"m{i}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(_source(package, i, lines=3 + 5 * n))
            expected[f"{package}/{path.relative_to(first / package).as_posix()}"] = path.read_bytes()
    (first / "alpha" / "shared.py").write_text(SHARED)          # kept (first in order) ...
    (first / "beta" / "copy_of_shared.py").write_text(SHARED)   # ... this copy removed
    expected["alpha/shared.py"] = SHARED.encode()
    (first / "single.py").write_text("import os\nprint(os.sep)\n")   # package "single"
    expected["single.py"] = (first / "single.py").read_bytes()
    # skipped: caches, other suffixes, this project, editable-install hooks, links, large files
    (first / "alpha" / "__pycache__").mkdir()
    (first / "alpha" / "__pycache__" / "m0.py").write_text("cached = True\n")
    (first / "alpha" / "data.json").write_text("{}")
    (first / "megatron_transmamba").mkdir()
    (first / "megatron_transmamba" / "x.py").write_text("ours = True\n")
    (first / "__editable___megatron_transmamba_0_1_0_finder.py").write_text("MAPPING = {}\n")
    os.symlink(first / "alpha" / "m0.py", first / "linked.py")
    (first / "gamma" / "table.py").write_text("T = [" + "0, " * 3000 + "]\n")   # > 4096 bytes
    second.mkdir()
    (second / "eta").mkdir()
    (second / "eta" / "__init__.py").write_text(_source("eta", 0, lines=40))
    (second / "eta" / "again.py").write_text(_source("alpha", 0, lines=3))  # = alpha/m0.py
    expected["eta/__init__.py"] = (second / "eta" / "__init__.py").read_bytes()
    return {"roots": [str(first), str(second)], "files": expected}


@pytest.fixture
def fake(tmp_path):
    return _fake_site_packages(tmp_path)


def _documents(prefix):
    dataset = IndexedDataset(prefix)
    eod = ByteTokenizer.EOD_ID
    docs = []
    for i in range(len(dataset)):
        tokens = dataset[i]
        assert tokens[-1] == eod
        docs.append(bytes(tokens[:-1].astype("uint8")))
    return docs


def test_package_of_and_the_fixed_order():
    assert package_of("numpy/core/x.py") == "numpy" and package_of("six.py") == "six"
    assert package_of("py.py") == "py" and package_of("a.py/b.py") == "a.py"
    assert 0 <= validation_score("torch") < 1
    assert validation_score("torch") == int(hashlib.sha256(b"torch").hexdigest()[:16], 16) / 2**64


def test_files_found_skipped_and_sorted(fake):
    files, skipped = find_source_files(fake["roots"], max_file_bytes=4096)
    found = [f.relative_path for f in files]
    assert sorted(found) == sorted(list(fake["files"]) + ["beta/copy_of_shared.py", "eta/again.py"])
    assert [(f.package, f.relative_path) for f in files] == sorted((f.package, f.relative_path)
                                                                    for f in files)
    assert skipped == {"over_max_file_bytes": 1, "project_entries": [
        "__editable___megatron_transmamba_0_1_0_finder.py", "megatron_transmamba"]}
    assert all(hashlib.sha256(Path(f.path).read_bytes()).hexdigest() == f.sha256 for f in files)


def test_split_is_by_package_without_duplicates(fake):
    files, _ = find_source_files(fake["roots"], max_file_bytes=4096)
    splits, duplicates = split_by_package(files, valid_fraction=0.2)
    train = {f.package for f in splits["train"]}
    valid = {f.package for f in splits["valid"]}
    assert valid and train and not train & valid
    assert train | valid == {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "single", "eta"}
    kept = [f.sha256 for name in ("train", "valid") for f in splits[name]]
    assert len(kept) == len(set(kept)) == len(fake["files"])
    assert duplicates["removed"] == 2 and duplicates["removed_bytes"] == len(SHARED) + len(
        fake["files"]["alpha/m0.py"])


def test_validation_takes_whole_packages_up_to_its_share_of_the_bytes(fake):
    files, _ = find_source_files(fake["roots"], max_file_bytes=4096)
    sizes = {}
    for f in files:
        sizes[f.package] = sizes.get(f.package, 0) + f.size
    total = sum(sizes.values())
    for fraction in (0.01, 0.1, 0.3, 0.6, 0.9):
        chosen = validation_packages(files, fraction)
        taken = sum(sizes[p] for p in chosen)
        assert chosen and len(chosen) < len(sizes), fraction
        order = sorted(sizes, key=validation_score)
        if len(chosen) > 1 or taken <= 2 * fraction * total:
            assert taken <= 2 * fraction * total, fraction
        else:                       # nothing fitted under twice the share: the first in order
            assert chosen == order[:1]
        # every package before the last one chosen was taken or did not fit
        last = max(order.index(p) for p in chosen)
        for p in order[:last]:
            assert p in chosen or sizes[p] > 2 * fraction * total, (fraction, p)


def test_corpus_datasets_manifest_and_identical_rebuilds(fake, tmp_path):
    out = tmp_path / "corpus"
    manifest = build_code_corpus(str(out), fake["roots"], valid_fraction=0.2, max_file_bytes=4096)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    splits = manifest["splits"]
    assert set(splits) == {"train", "valid"} and splits["valid"]["files"] >= 1
    assert manifest["site_packages"] == fake["roots"] and manifest["py_files_found"] == len(
        fake["files"]) + 2
    assert manifest["duplicates"]["removed"] == 2
    assert manifest["skipped"]["over_max_file_bytes"] == 1
    documents = {name: _documents(str(out / name)) for name in ("train", "valid")}
    for name, split in splits.items():
        assert split["prefix"] == str(out / name)
        assert split["documents"] == split["files"] == len(documents[name])
        assert split["bytes"] == sum(len(d) for d in documents[name])
        assert split["tokens"] == split["bytes"] + split["files"]      # bytes + one EOD each
        assert split["packages"] == len(split["package_names"])
    assert sorted(documents["train"] + documents["valid"]) == sorted(fake["files"].values())
    assert not set(splits["train"]["package_names"]) & set(splits["valid"]["package_names"])

    again = build_code_corpus(str(tmp_path / "again"), fake["roots"], valid_fraction=0.2,
                              max_file_bytes=4096)
    for name in ("train", "valid"):
        for suffix in (".bin", ".idx"):
            assert (out / f"{name}{suffix}").read_bytes() == (tmp_path / "again" / f"{name}{suffix}"
                                                              ).read_bytes()
        again["splits"][name].pop("prefix"), manifest["splits"][name].pop("prefix")
    assert again == manifest

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    logs = []
    assert build_code_corpus(str(out), fake["roots"], valid_fraction=0.2, max_file_bytes=4096,
                             log=logs.append) == on_disk
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before and "up to date" in logs[0]
    Path(fake["roots"][1], "eta", "new.py").write_text("changed = 1\n")     # a new file: rebuilt
    rebuilt = build_code_corpus(str(out), fake["roots"], valid_fraction=0.2, max_file_bytes=4096)
    assert rebuilt["py_files_found"] == manifest["py_files_found"] + 1


@pytest.mark.parametrize("case, message", [
    ("missing root", r"^{root}/absent: not a directory; expected a site-packages folder$"),
    ("one package", r"^the site-packages directories hold only 'solo' of the packages with \.py "
                    r"files; expected at least 2"),
    ("no files", r"^no \.py files under {root}/empty; expected"),
    ("bad fraction", r"^valid_fraction=1\.5: expected a number in \(0, 1\)$"),
    ("output is a file", r"^{root}/out: exists and is not a directory; expected an output folder$"),
    ("bad tokenizer", r"^tokenizer='gpt2': expected byte, hf or train-bpe$"),
])
def test_errors_are_one_line_and_write_nothing(case, message, tmp_path):
    fake = _fake_site_packages(tmp_path / "tree")
    roots, fraction, out, tokenizer = fake["roots"], 0.2, tmp_path / "out", "byte"
    if case == "missing root":
        roots = [str(tmp_path / "absent")]
    elif case == "one package":
        (tmp_path / "solo" / "solo").mkdir(parents=True)
        (tmp_path / "solo" / "solo" / "a.py").write_text("a = 1\n")
        roots = [str(tmp_path / "solo")]
    elif case == "no files":
        (tmp_path / "empty").mkdir()
        roots = [str(tmp_path / "empty")]
    elif case == "bad fraction":
        fraction = 1.5
    elif case == "output is a file":
        out.write_text("")
    elif case == "bad tokenizer":
        tokenizer = "gpt2"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CorpusError, match=message.format(root=tmp_path)) as error:
        build_code_corpus(str(out), roots, valid_fraction=fraction, tokenizer_kind=tokenizer)
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_unreadable_file_is_named(fake, tmp_path, monkeypatch):
    real_open = open

    def refuse(path, *args, **kwargs):
        if str(path).endswith("beta/m1.py"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(code_corpus, "open", refuse, raising=False)
    with pytest.raises(CorpusError, match=r"^.*site-a/beta/m1\.py: cannot be read \(Permission "
                                          r"denied\); expected a readable site-packages tree$"):
        build_code_corpus(str(tmp_path / "out"), fake["roots"])
    assert not (tmp_path / "out").exists()


def _run_tool(args, monkeypatch):
    """tools/data/build_code_corpus.py as ``python tools/... args`` runs it, in this process."""
    monkeypatch.setattr(sys, "argv", ["build_code_corpus.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_ROOT / "tools" / "data" / "build_code_corpus.py"),
                       run_name="__main__")
    return exit_info.value.code


def test_command_line(fake, tmp_path, monkeypatch, capsys):
    out = tmp_path / "corpus"
    args = ["--output", str(out), "--valid-fraction", "0.2", "--max-file-bytes", "4096"]
    for root in fake["roots"]:
        args += ["--site-packages", root]
    assert _run_tool(args, monkeypatch) == 0
    assert f"use with: --data.data_path=[{out}/train] --data.valid_data_path=[{out}/valid]" \
        in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["splits"]["valid"]["files"] >= 1
    # the interpreter prints a SystemExit's message as the one line on stderr, status 1
    code = _run_tool(["--output", str(tmp_path / "x"), "--site-packages", str(tmp_path / "absent")],
                     monkeypatch)
    assert code == f"error: {tmp_path}/absent: not a directory; expected a site-packages folder"
    assert not (tmp_path / "x").exists()
