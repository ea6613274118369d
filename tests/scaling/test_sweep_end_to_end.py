"""The tiny CPU sweep (examples/sweeps/tiny_cpu.yaml: 2 families x 3 widths x 2 budgets) end to
end through the command line: a preempted run resumes, a failed run is reported and retried,
a partial launch is completed by the next one, finished runs are never trained again, and the
CSV, fit and PNGs come out."""

import csv
import json
import math
import os
import struct

import pytest
import yaml

from megatron_transmamba.scaling import cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "examples", "sweeps", "tiny_cpu.yaml")
PREEMPTED = "transmamba-w48-D12.3K-s1"
BROKEN = "transformer-w32-D6.14K-s1"


def snapshot(out):
    """run -> (result.json mtime and text, number of training segments), for finished runs."""
    state = {}
    for name in sorted(os.listdir(os.path.join(out, "runs"))):
        folder = os.path.join(out, "runs", name)
        result = os.path.join(folder, "result.json")
        if os.path.exists(result):
            with open(os.path.join(folder, "segments.jsonl")) as f:
                segments = len(f.read().splitlines())
            state[name] = (os.stat(result).st_mtime_ns, open(result).read(), segments)
    return state


def segments(out, name):
    with open(os.path.join(out, "runs", name, "segments.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Runs the stages once; the tests below check what each left behind."""
    root = tmp_path_factory.mktemp("tiny_sweep")
    with open(TINY) as f:
        raw = yaml.safe_load(f)
    raw["base"]["data"]["cache_dir"] = str(root / "data_cache")
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = str(root / "out")
    stages = {}

    assert cli.main(["plan", str(path), "--out", out]) == 0
    # preempted: stops at step 20 of 48 (checkpoints every 10 steps)
    assert cli.main(["launch", str(path), "--out", out, "--only", PREEMPTED,
                     "--training.exit_at_step=20"]) == 0
    stages["preempted_segments"] = segments(out, PREEMPTED)
    stages["preempted_files"] = sorted(os.listdir(os.path.join(out, "runs", PREEMPTED)))
    # failed: bf16 on a CPU is refused by the trainer; the launch reports it
    assert cli.main(["launch", str(path), "--out", out, "--only", BROKEN,
                     "--training.precision=bf16"]) == 1
    stages["error"] = open(os.path.join(out, "runs", BROKEN, "error.txt")).read()
    # partial: the first 4 unfinished runs in plan order (the preempted one resumes among them)
    assert cli.main(["launch", str(path), "--out", out, "--max-runs", "4"]) == 0
    stages["after_partial"] = snapshot(out)
    assert cli.main(["run", str(path), "--out", out, "--bootstrap", "8"]) == 0
    stages["after_run"] = snapshot(out)
    assert cli.main(["run", out, "--bootstrap", "8"]) == 0      # the output folder works too
    stages["after_rerun"] = snapshot(out)
    return out, stages


def test_preempted_run_resumes_from_its_checkpoint(sweep):
    out, stages = sweep
    first = stages["preempted_segments"]
    assert [(s["start_step"], s["end_step"]) for s in first] == [(0, 20)]
    assert "result.json" not in stages["preempted_files"] and "checkpoints" in stages["preempted_files"]
    assert [(s["start_step"], s["end_step"]) for s in segments(out, PREEMPTED)] == [(0, 20), (20, 48)]
    assert "resuming from step 20" in open(os.path.join(out, "runs", PREEMPTED, "train.log")).read()
    result = json.load(open(os.path.join(out, "runs", PREEMPTED, "result.json")))
    assert result["segments"] == 2 and result["train_iters"] == 48
    # keep_checkpoints: false in the sweep file
    assert not os.path.exists(os.path.join(out, "runs", PREEMPTED, "checkpoints"))


def test_failed_run_is_reported_then_retrained(sweep):
    out, stages = sweep
    assert "needs a GPU" in stages["error"]
    assert not os.path.exists(os.path.join(out, "runs", BROKEN, "error.txt"))
    assert BROKEN in stages["after_run"]


def test_finished_runs_are_never_trained_again(sweep):
    out, stages = sweep
    partial, full, rerun = stages["after_partial"], stages["after_run"], stages["after_rerun"]
    assert len(partial) == 4 and PREEMPTED in partial
    assert len(full) == 12
    for name, state in partial.items():
        assert full[name] == state, name
    assert rerun == full
    assert all(n == 1 for name, (_, _, n) in full.items() if name != PREEMPTED)


def test_results_csv_has_every_run(sweep):
    out, _ = sweep
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {r["status"] for r in rows} == {"done"}
    assert {r["family"] for r in rows} == {"transmamba", "transformer"}
    for row in rows:
        for key in ("params", "tokens", "flops", "valid_loss", "train_loss", "final_train_loss",
                    "wall_seconds", "tokens_per_second"):
            assert math.isfinite(float(row[key])) and float(row[key]) > 0, (row["name"], key)
        assert float(row["tokens"]) == float(row["train_iters"]) * 256
        assert float(row["valid_loss"]) < float(row["initial_valid_loss"]) - 0.5
        result = json.load(open(os.path.join(out, "runs", row["name"], "result.json")))
        assert result["num_parameters_trainer"] == int(row["params"])   # flops.py == the model


def test_fit_json_has_a_law_and_uncertainty_per_family(sweep):
    out, _ = sweep
    fit = json.load(open(os.path.join(out, "fit.json")))
    assert list(fit["families"]) == ["transmamba", "transformer"]
    for family in fit["families"].values():
        assert family["n_runs"] == 6
        assert all(math.isfinite(family["law"][k]) for k in ("E", "A", "B", "alpha", "beta"))
        assert family["bootstrap"]["n"] == 8 and set(family["bootstrap"]["std"]) == {"E", "A", "B", "alpha", "beta"}
        assert len(family["frontier"]["points"]) == 25


def test_plots_are_real_pngs(sweep):
    out, _ = sweep
    for name in ("loss_vs_compute.png", "frontier.png"):
        data = open(os.path.join(out, "plots", name), "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", name
        width, height = struct.unpack(">II", data[16:24])
        assert width > 300 and height > 200 and len(data) > 10_000, name


def test_torchrun_mode_trains_a_run_through_the_worker_module(sweep, tmp_path):
    out, _ = sweep
    with open(os.path.join(out, "sweep.yaml")) as f:
        raw = yaml.safe_load(f)
    raw["size"]["values"] = [32]
    raw["budget"] = {"tokens": [2560]}            # 10 steps
    raw["families"] = raw["families"][1:]
    raw["output_dir"] = str(tmp_path / "torchrun")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["launch", str(path), "--mode", "torchrun"]) == 0
    result = json.load(open(tmp_path / "torchrun" / "runs" / "transformer-w32-D2.56K-s1" / "result.json"))
    assert result["train_iters"] == 10 and math.isfinite(result["valid_loss"])
