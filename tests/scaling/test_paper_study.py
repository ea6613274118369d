"""The paper quality study (docs/paper_study.md) end to end on CPU at toy size: the six model
kinds of examples/sweeps/paper_study_cpu.yaml (two seeds for two of them) on a code corpus
built from a fake site-packages tree, trained on its train split and evaluated on its
validation split; --only trains a subset, a rerun skips finished runs, and the CSVs, the
markdown table and both PNGs come out. Also: the GPU study file plans to the sized runs and the
GPU script's chunks cover every run once."""

import csv
import json
import math
import os
import re
import struct
import time

import pytest
import yaml

from megatron_transmamba.data.code_corpus import build_code_corpus
from megatron_transmamba.scaling import cli
from megatron_transmamba.scaling.launch import launch_local, select_runs
from megatron_transmamba.scaling.plan import PlannedRun, expand, pattern_for_depth
from megatron_transmamba.scaling.run_folder import RunFolder
from megatron_transmamba.scaling.study import check_study, loss_at, loss_curve
from megatron_transmamba.scaling.sweep_file import build_sweep, load_sweep
from megatron_transmamba.scaling.worker import INTERRUPTED

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU = os.path.join(REPO, "examples", "sweeps", "paper_study_cpu.yaml")
GPU = os.path.join(REPO, "examples", "sweeps", "paper_study_gpu.yaml")
MODELS = ["transformer", "mamba2", "hybrid", "transmamba_v9", "transmamba_fixed", "transmamba_v1"]
FIRST = ("transformer", "mamba2")         # the --only subset trained first


def _fake_corpus(root):
    """A code corpus from 6 fake packages (about 60 kB)."""
    site = root / "site-packages"
    for p, package in enumerate(["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]):
        for i in range(4):
            path = site / package / f"m{i}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(f"def {package}_{i}_{j}(x):\n    return x * {j + p} + {i}\n\n"
                                    for j in range(60)))
    return build_code_corpus(str(root / "corpus"), [str(site)], valid_fraction=0.2)


def _study_file(root, corpus, **changes):
    """paper_study_cpu.yaml on the fake corpus, at 4 steps of 4 x 32 tokens, validated after
    every step (1 = 1/4, 2 = 1/2)."""
    with open(CPU) as f:
        raw = yaml.safe_load(f)
    raw["size"].update(values=[16], head_dim=8)
    raw["budget"] = {"tokens": [512]}
    raw["schedule"]["min_train_iters"] = 4
    base = raw["base"]
    base["model"].update(seq_length=32)
    base["data"].update(data_path=[corpus["splits"]["train"]["prefix"]],
                        valid_data_path=[corpus["splits"]["valid"]["prefix"]],
                        cache_dir=str(root / "cache"))
    base["training"].update(micro_batch_size=4, eval_interval=1, eval_iters=1, log_interval=4)
    base["checkpoint"]["save_interval"] = 100        # only the final checkpoint
    for family in raw["families"]:
        if family["name"] == "transmamba_fixed":
            family["transpoint_values"] = [8]         # T / 4 at T = 32
    for key, value in changes.items():
        base["training"][key] = value
    path = root / f"study{len(changes)}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _done_state(out):
    """run -> result.json mtime, for the finished runs."""
    runs = os.path.join(out, "runs")
    return {name: os.stat(os.path.join(runs, name, "result.json")).st_mtime_ns
            for name in sorted(os.listdir(runs))
            if os.path.exists(os.path.join(runs, name, "result.json"))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_study")
    return root, _fake_corpus(root)


@pytest.fixture(scope="module")
def study(corpus):
    root, corpus = corpus
    sweep = _study_file(root, corpus)
    out = str(root / "out")
    stages = {"corpus": corpus, "sweep": sweep, "root": root}
    assert cli.main(["study", sweep, "--out", out, "--only", ",".join(FIRST)]) == 0
    stages["after_only"] = _done_state(out)
    stages["rows_after_only"] = list(csv.DictReader(open(os.path.join(out, "study.csv"))))
    assert cli.main(["study", sweep, "--out", out]) == 0
    stages["after_all"] = _done_state(out)
    assert cli.main(["study", out]) == 0          # the output folder: nothing left to train
    stages["after_rerun"] = _done_state(out)
    return out, stages


def test_only_trains_the_selected_models(study):
    out, stages = study
    assert sorted(stages["after_only"]) == ["mamba2-w16-D512-s1", "transformer-w16-D512-s1",
                                            "transformer-w16-D512-s2"]
    rows = stages["rows_after_only"]
    assert len(rows) == 8
    assert {r["model"] for r in rows if r["status"] == "done"} == set(FIRST)
    assert all(r["valid_loss"] == "" for r in rows if r["status"] != "done")


def test_rerun_skips_finished_runs(study):
    out, stages = study
    assert len(stages["after_all"]) == 8
    for name, mtime in stages["after_only"].items():
        assert stages["after_all"][name] == mtime, name
    assert stages["after_rerun"] == stages["after_all"]
    for name in stages["after_all"]:
        with open(os.path.join(out, "runs", name, "segments.jsonl")) as f:
            assert len(f.read().splitlines()) == 1, name


def test_csv_rows_and_curves(study):
    out, stages = study
    rows = list(csv.DictReader(open(os.path.join(out, "study.csv"))))
    assert [r["model"] for r in rows] == ["transformer", "transformer", "mamba2", "hybrid",
                                          "transmamba_v9", "transmamba_v9", "transmamba_fixed",
                                          "transmamba_v1"]
    assert [int(r["seed"]) for r in rows] == [1, 2, 1, 1, 1, 2, 1, 1]
    curves = list(csv.DictReader(open(os.path.join(out, "curves.csv"))))
    valid_prefix = stages["corpus"]["splits"]["valid"]["prefix"]
    for row in rows:
        assert row["status"] == "done" and row["tokens"] == "512" and row["train_iters"] == "4"
        for key in ("params", "valid_loss", "valid_loss_at_quarter", "valid_loss_at_half",
                    "initial_valid_loss", "tokens_per_second", "train_seconds", "wall_seconds"):
            assert math.isfinite(float(row[key])) and float(row[key]) > 0, (row["run"], key)
        points = {int(c["step"]): c for c in curves if c["run"] == row["run"]}
        assert sorted(points) == [0, 1, 2, 3, 4]
        assert float(points[1]["valid_loss"]) == float(row["valid_loss_at_quarter"])
        assert float(points[2]["valid_loss"]) == float(row["valid_loss_at_half"])
        assert float(points[4]["valid_loss"]) == float(row["valid_loss"])
        seconds = [float(points[s]["train_seconds"]) for s in sorted(points)]
        assert seconds[0] == 0 and seconds == sorted(seconds) and seconds[-1] <= float(
            row["train_seconds"]) + 1e-6
        config = yaml.safe_load(open(os.path.join(out, row["config"])))
        assert config["data"]["valid_data_path"] == [valid_prefix]
        assert config["data"]["valid_seed"] == 1234
        record = json.load(open(os.path.join(out, "runs", row["run"], "run.json")))
        assert int(row["params"]) == record["params"]
    by = {(r["model"], r["seed"]): r for r in rows}
    assert by[("hybrid", "1")]["layer_pattern"] == "M-M-*-M-M-M-"
    assert by[("transmamba_v9", "1")]["transpoints"] == "0 0 1 2 4 8"      # V9 at T = 32
    assert by[("transmamba_fixed", "1")]["transpoints"] == by[("transmamba_v1", "1")]["transpoints"] \
        == "8 8 8 8 8 8"
    # the same model, seed and batches: the same losses (this is why the report notes it)
    assert by[("transmamba_fixed", "1")]["valid_loss"] == by[("transmamba_v1", "1")]["valid_loss"]
    # the same validation batches for both seeds, different training
    assert by[("transformer", "1")]["valid_loss"] != by[("transformer", "2")]["valid_loss"]


def test_markdown_table(study):
    out, _ = study
    text = open(os.path.join(out, "study.md")).read()
    assert "8 of 8 runs done." in text and "## By model" in text and "## By run" in text
    table = text[text.index("## By model"):text.index("## By run")]
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + len(MODELS)
    assert "seed spread" in lines[0] and "vs transformer" in lines[0] and "at 1/4" in lines[0]
    for model, line in zip(MODELS, lines[1:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == model
        assert cells[4] == ("2" if model in ("transformer", "transmamba_v9") else "1")
        assert re.fullmatch(r"\d\.\d{4}", cells[5])                      # final loss
        assert re.fullmatch(r"\d\.\d{4}" if cells[4] == "2" else "-", cells[6])    # spread
    assert "transmamba_fixed and transmamba_v1 train the same model" in text
    assert "Not finished" not in text


def test_plots_are_real_pngs(study):
    out, _ = study
    for name in ("valid_loss_vs_tokens.png", "valid_loss_vs_time.png"):
        data = open(os.path.join(out, "plots", name), "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", name
        width, height = struct.unpack(">II", data[16:24])
        assert width > 500 and height > 300 and len(data) > 20_000, name


def test_report_rebuilds_from_the_folder(study, capsys):
    out, _ = study
    os.remove(os.path.join(out, "study.md"))
    os.remove(os.path.join(out, "plots", "valid_loss_vs_time.png"))
    assert cli.main(["report", out]) == 0
    assert os.path.exists(os.path.join(out, "study.md"))
    assert os.path.exists(os.path.join(out, "plots", "valid_loss_vs_time.png"))
    assert "| transmamba_v9 |" in capsys.readouterr().out


def test_bad_selection_or_sparse_evaluation_is_one_line_before_writing(study, tmp_path, capsys):
    _, stages = study
    out = tmp_path / "none"
    assert cli.main(["study", stages["sweep"], "--out", str(out), "--only", "transfomer"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'transfomer' matches no run or family" in err[0], err
    sparse = _study_file(stages["root"], stages["corpus"], eval_interval=2)
    assert cli.main(["study", sparse, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training.eval_interval=2" in err[0] and "at most 1" in err[0], err
    assert not out.exists()


def test_time_budget_starts_no_run_that_would_not_fit(tmp_path, monkeypatch):
    from megatron_transmamba.scaling import launch

    spec = load_sweep(CPU)
    runs = [PlannedRun(f"r{i}", RunFolder(str(tmp_path / f"r{i}")), {}, {"family": "x"})
            for i in range(3)]
    trained = []

    def fake_train(run, overrides):
        trained.append(run.name)
        time.sleep(0.3)
        return INTERRUPTED

    monkeypatch.setattr(launch, "_train_in_process", fake_train)
    logs = []
    launch_local(spec, runs, "inprocess", time_budget_s=0.5, log=logs.append)
    assert trained == ["r0"]            # 0.3 s used + the longest run (0.3 s) > 0.5 s
    assert "not starting 2: r1, r2" in logs[-1]


def test_only_takes_globs_of_names_and_families(tmp_path):
    runs = [PlannedRun(n, RunFolder(str(tmp_path / n)), {}, {"family": n.split("-")[0]})
            for n in ("transformer-w8-D1K-s1", "transformer-w8-D1K-s2", "mamba2-w8-D1K-s1")]
    names = lambda only: [r.name for r in select_runs(runs, only)]  # noqa: E731
    assert names("mamba2") == ["mamba2-w8-D1K-s1"]
    assert names("transformer-*-s2,mamba2") == ["transformer-w8-D1K-s2", "mamba2-w8-D1K-s1"]
    assert names(None) == [r.name for r in runs]


def test_loss_at_interpolates_between_logged_steps(tmp_path):
    curve = [(0, 5.0, 0.0), (10, 3.0, 1.0), (20, 2.0, 2.0)]
    assert loss_at(curve, 10) == 3.0 and loss_at(curve, 5) == 4.0 and loss_at(curve, 15) == 2.5
    assert math.isnan(loss_at(curve, 25))
    folder = RunFolder(str(tmp_path / "run"))
    os.makedirs(folder.path)
    folder.append_segment({"start_step": 0, "end_step": 10, "train_seconds": 4.0,
                           "valid_losses": {"0": 5.0, "10": 3.0},
                           "valid_train_seconds": {"0": 0.0, "10": 4.0}})
    folder.append_segment({"start_step": 10, "end_step": 20, "train_seconds": 5.0,
                           "valid_losses": {"20": 2.0}, "valid_train_seconds": {"20": 5.0}})
    assert loss_curve(folder) == [(0, 5.0, 0.0), (10, 3.0, 4.0), (20, 2.0, 9.0)]


def test_family_seeds_are_checked():
    with open(CPU) as f:
        raw = yaml.safe_load(f)
    raw["families"][0]["seeds"] = [1, 1]
    with pytest.raises(ValueError, match=r"families\[0\]\.seeds=\[1, 1\]: seeds must be unique"):
        build_sweep(raw)
    raw["families"][0]["seeds"] = "1"
    with pytest.raises(ValueError, match=r"families\[0\]\.seeds='1': needs a list of integers"):
        build_sweep(raw)


def test_the_gpu_study_plans_as_sized(corpus, tmp_path):
    with open(GPU) as f:
        raw = yaml.safe_load(f)
    splits = corpus[1]["splits"]                  # any corpus: the plan only checks the files
    raw["base"]["data"].update(data_path=[splits["train"]["prefix"]],
                               valid_data_path=[splits["valid"]["prefix"]])
    runs = expand(build_sweep(raw), str(tmp_path / "gpu"))
    records = {r.name: r.record for r in runs}
    assert len(runs) == 8
    assert {r["tokens"] for r in records.values()} == {58_982_400}
    assert {r["train_iters"] for r in records.values()} == {900}
    assert {r["num_layers"] for r in records.values()} == {24}
    by_model = {r["family"]: r for r in records.values()}
    with open(os.path.join(REPO, "examples", "configs", "hybrid_400m.yaml")) as f:
        hybrid_400m = yaml.safe_load(f)["model"]["layer_pattern"]
    assert by_model["hybrid"]["layer_pattern"] == hybrid_400m == pattern_for_depth("M-M-*-M-M-M-", 12)
    assert by_model["transmamba_v9"]["transpoints"][:8] == [0, 32, 64, 128, 256, 512, 1024, 2048]
    assert by_model["transmamba_fixed"]["transpoints"] == [512] * 12
    # the numbers in the file's sizing comment
    for model, params, per_token in [("transformer", 38.88, 3.08e8), ("mamba2", 42.17, 2.61e8),
                                     ("hybrid", 41.62, 2.69e8), ("transmamba_v9", 42.17, 2.68e8),
                                     ("transmamba_fixed", 42.17, 2.64e8)]:
        assert round(by_model[model]["params"] / 1e6, 2) == params, model
        assert by_model[model]["flops_per_token"] == pytest.approx(per_token, rel=2e-3), model
    training = runs[0].config["training"]
    assert training["cuda_graphs"] and training["precision"] == "bf16"
    assert runs[0].config["model"]["mixer_backend"] == "triton"
    assert 900 % (4 * training["eval_interval"]) == 0          # 1/4 and 1/2 are logged steps
    assert by_model["transmamba_v2"]["transpoints"] == [1024] * 12
    assert not any("the same model" in n for n in check_study(runs))      # V1 = fixed T/4: once

    # the GPU script's three chunks train every run once
    script = open(os.path.join(REPO, "tools", "bench", "paper_study_gpu.sh")).read()
    chunks = re.findall(r"^  ([123])\) runs=\((.*)\) ;;$", script, flags=re.M)
    assert [c for c, _ in chunks] == ["1", "2", "3"]
    seen = []
    for _, globs in chunks:
        for only in re.findall(r'"([^"]+)"', globs):
            matched = [r.name for r in select_runs(runs, only)]
            assert len(matched) == 1, (only, matched)
            seen += matched
    assert sorted(seen) == sorted(records)
