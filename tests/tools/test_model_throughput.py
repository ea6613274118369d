"""tools/bench/model_throughput.py at tiny shapes on CPU: one record per run with every field,
ratios to the Transformer, failed and skipped runs recorded while the others go on."""

import json
import pathlib
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "bench"))
import model_throughput  # noqa: E402

SHAPE = ("hidden_size: 64, ffn_hidden_size: 128, num_attention_heads: 4, seq_length: 64, "
         "mamba_num_heads: 4, mamba_num_groups: 2, mamba_head_dim: 16, mamba_state_dim: 16, "
         "ssd_chunk_size: 16, mixer_backend: torch")
FIELDS = {"config", "layer_pattern", "parameters", "T", "micro_batch", "variant", "step_ms",
          "tokens_per_s", "model_tflops_per_gpu", "mfu", "mfu_measured_matmul_peak", "peak_gib",
          "host_ms_per_step", "device_ms_per_step", "launches_per_step", "final_loss", "status",
          "error", "ratio_to_transformer"}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("configs")
    cache = folder / "data"
    paths = []
    for name, pattern, schedule in (("transmamba", "T-", "v9"), ("transformer", "*-",
                                                                  "transformer")):
        path = folder / f"{name}.yaml"
        path.write_text(f"model: {{layer_pattern: '{pattern}', transpoint_schedule: {schedule}, "
                        f"{SHAPE}}}\ndata: {{tokenizer: byte, cache_dir: '{cache}'}}\n"
                        "training: {precision: fp32}\n")
        paths.append(str(path))
    return paths


def test_records_ratios_and_a_failed_variant(configs, tmp_path, capsys):
    variants = "eager,cuda_graphs,compile"
    assert model_throughput.main([
        "--configs", ",".join(configs), "--seq-lengths", "64", "--micro-batch-sizes", "2",
        "--variants", variants, "--steps", "3", "--warmup", "1", "--name", "tiny",
        "--out-dir", str(tmp_path), "--training.lr=1e-3"]) == 0
    out = json.loads((tmp_path / "tiny.json").read_text())
    assert {"device", "versions", "git", "date", "command", "records",
            "ratio_to_transformer"} <= set(out)
    assert out["versions"]["torch"] == torch.__version__ and "megatron-core" in out["versions"]
    records = out["records"]
    assert [(pathlib.Path(r["config"]).stem, r["variant"]) for r in records] == [
        (name, v) for v in variants.split(",") for name in ("transmamba", "transformer")]
    for r in records:
        if r["variant"] == "cuda_graphs":      # CPU: refused, recorded, and the next run goes on
            assert r["status"] == "error" and r["error"].endswith("training.cuda_graphs needs CUDA")
            assert r["ratio_to_transformer"] is None
            continue
        assert r["status"] == "ok", r
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["T"] == 64 and r["micro_batch"] == 2 and len(r["losses"]) == 4
        assert r["step_ms"] > 0 and r["host_ms_per_step"] > 0
        assert r["tokens_per_s"] == pytest.approx(2 * 64 / (r["step_ms"] / 1e3))
        assert r["launches_per_step"] is None and r["mfu"] is None     # CPU
    by = {(pathlib.Path(r["config"]).stem, r["variant"]): r for r in records}
    for variant in ("eager", "compile"):
        transmamba, transformer = by["transmamba", variant], by["transformer", variant]
        assert transformer["ratio_to_transformer"] == 1.0
        assert transmamba["ratio_to_transformer"] == pytest.approx(
            transmamba["step_ms"] / transformer["step_ms"])
        assert transmamba["layer_pattern"] == "T-" and transformer["layer_pattern"] == "*-"
    # the compiled layers train as the eager ones do (fp32)
    for name in ("transmamba", "transformer"):
        assert by[name, "compile"]["losses"] == pytest.approx(by[name, "eager"]["losses"],
                                                              rel=1e-5, abs=1e-5)
    assert "| transmamba.yaml | 64 | 2 | compile | ok |" in capsys.readouterr().out


def test_runs_past_the_time_budget_are_recorded_as_skipped(configs, tmp_path):
    assert model_throughput.main([
        "--configs", ",".join(configs), "--seq-lengths", "64,128", "--micro-batch-sizes", "1",
        "--variants", "eager", "--steps", "2", "--warmup", "1", "--name", "skipped",
        "--out-dir", str(tmp_path), "--time-budget-s", "0"]) == 0
    records = json.loads((tmp_path / "skipped.json").read_text())["records"]
    assert [(r["T"], r["status"]) for r in records] == [(64, "skipped")] * 2 + [(128, "skipped")] * 2
