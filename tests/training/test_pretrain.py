"""End-to-end training on the embedded corpus: the loss falls, and resume is exact."""

import pytest

from megatron_transmamba.training.config import build_run_config
from megatron_transmamba.training.pretrain import pretrain

TINY_MODEL = dict(layer_pattern="T-*-M-", hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                  mamba_num_heads=4, mamba_num_groups=2, mamba_head_dim=16, mamba_state_dim=16,
                  seq_length=128, transpoint_schedule="fixed", transpoint_values=[48], ssd_chunk_size=32)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


def run_config(data_cache, save=None, **training):
    return build_run_config({
        "model": TINY_MODEL,
        "data": {"cache_dir": data_cache},
        "training": {"micro_batch_size": 8, "lr": 3e-3, "min_lr": 3e-4, "lr_warmup_iters": 5,
                     "eval_iters": 4, "log_interval": 10, **training},
        "checkpoint": {"save": save, "save_interval": 1000},
        "logging": {"progress_bar": False},
    })


def test_validation_loss_falls_on_embedded_corpus(data_cache):
    result = pretrain(run_config(data_cache, train_iters=60, eval_interval=60))
    start, end = result.valid_losses[0], result.valid_losses[60]
    # byte-level tokens: ln(vocab) ~ 5.8 at start; Python source is very predictable
    assert start > 5.0
    assert end < start - 2.0, result.valid_losses


def test_resume_reproduces_the_uninterrupted_run_exactly(data_cache, tmp_path):
    full = pretrain(run_config(data_cache, train_iters=10, eval_interval=0))
    stopped = pretrain(run_config(data_cache, save=str(tmp_path), train_iters=10, eval_interval=0,
                                  exit_at_step=4))
    assert sorted(stopped.train_losses) == [1, 2, 3, 4]
    resumed_cfg = run_config(data_cache, save=str(tmp_path), train_iters=10, eval_interval=0)
    resumed_cfg.checkpoint.resume = True
    resumed = pretrain(resumed_cfg)
    assert sorted(resumed.train_losses) == list(range(5, 11))
    for step in range(1, 5):
        assert stopped.train_losses[step] == full.train_losses[step], step
    for step in range(5, 11):
        assert resumed.train_losses[step] == full.train_losses[step], step


def test_profile_writes_a_trace_and_a_table_of_the_window_only(data_cache, tmp_path, capsys):
    cfg = run_config(data_cache, train_iters=6, eval_interval=0)
    cfg.logging.profile, cfg.logging.profile_dir = True, str(tmp_path / "profile")
    cfg.logging.profile_step_start, cfg.logging.profile_step_end = 2, 3
    result = pretrain(cfg)
    assert len(result.train_losses) == 6
    out = capsys.readouterr().out
    assert out.count("profile of steps 2-3 on rank 0") == 1, out
    assert "Self CPU time total" in out                # the operator table
    import json
    with open(tmp_path / "profile" / "rank0.json") as f:
        trace = json.load(f)
    names = {event.get("name") for event in trace["traceEvents"]}
    assert any("aten::" in str(name) for name in names)  # operators of the training step


@pytest.mark.parametrize("logging, message", [
    ({"profile": True, "profile_step_start": 3, "profile_step_end": 2}, "1 <= start <= end"),
    ({"profile": True, "profile_step_end": 99}, "training.train_iters=10"),
    ({"profile": True, "profile_ranks": [-1]}, "logging.profile_ranks"),
])
def test_bad_profile_window_names_the_fields(logging, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        build_run_config({"training": {"train_iters": 10, "lr_warmup_iters": 1},
                          "logging": logging})
