"""Train -> export to Hugging Face -> import -> continue pretraining from the same weights."""

import torch

from megatron_transmamba.hf import export as E
from megatron_transmamba.parallel.initialize import destroy_distributed
from megatron_transmamba.training.config import build_run_config
from megatron_transmamba.training.pretrain import pretrain

MODEL = dict(layer_pattern="T-M-", hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
             mamba_num_heads=4, mamba_num_groups=2, mamba_head_dim=8, mamba_state_dim=8,
             seq_length=64, transpoint_schedule="fixed", transpoint_values=[20], ssd_chunk_size=16)


def run_config(save, cache, iters, resume=False):
    return build_run_config({
        "model": MODEL, "data": {"cache_dir": cache},
        "training": {"micro_batch_size": 4, "train_iters": iters, "lr_warmup_iters": 1,
                     "eval_interval": iters, "eval_iters": 2, "log_interval": 100},
        "checkpoint": {"save": save, "resume": resume}, "logging": {"progress_bar": False}})


def test_imported_checkpoint_continues_from_the_same_weights(tmp_path):
    cache = str(tmp_path / "cache")
    first = pretrain(run_config(str(tmp_path / "a"), cache, 4))
    E.export_checkpoint(str(tmp_path / "a"), str(tmp_path / "hf"), tolerance=1e-4)
    destroy_distributed()
    E.import_hf(str(tmp_path / "hf"), str(tmp_path / "b"), 1)
    destroy_distributed()
    second = pretrain(run_config(str(tmp_path / "b"), cache, 2, resume=True))
    # same weights, same validation batches: the continued run starts where the first ended
    assert second.valid_losses[0] == first.valid_losses[4]
    assert sorted(second.train_losses) == [1, 2]
    assert all(torch.isfinite(torch.tensor(list(second.train_losses.values()))))
