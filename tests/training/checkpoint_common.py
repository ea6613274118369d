"""The run config of the checkpoint tests (in-process runs and the torchrun workers): a tiny model
with T, M, * and - layers (TransPoint 13, mid-chunk), float32, global batch 8 in micro-batches
of 2, so that TP = 2 x PP = 2, DP = 2 and DP = 4 all train on the same batches."""

from pathlib import Path

from megatron_transmamba.training.config import build_run_config

MODEL = dict(layer_pattern="T-M-*-", hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
             num_query_groups=2, kv_channels=8, mamba_num_heads=4, mamba_num_groups=2,
             mamba_head_dim=8, mamba_state_dim=8, seq_length=32, transpoint_schedule="fixed",
             transpoint_values=[13], ssd_chunk_size=8)
TRAIN_ITERS = 6


def raw_config(cache_dir, save=None, resume=False, model=None, checkpoint=None, parallel=None,
               **training) -> dict:
    return {
        "model": {**MODEL, **(model or {})},
        "data": {"cache_dir": str(cache_dir)},
        "training": {"micro_batch_size": 2, "global_batch_size": 8, "train_iters": TRAIN_ITERS,
                     "lr": 3e-3, "min_lr": 3e-4, "lr_warmup_iters": 1, "eval_interval": 0,
                     "log_interval": 1, "precision": "fp32", **training},
        "checkpoint": {"save": None if save is None else str(save), "resume": resume,
                       "save_interval": 2, "keep_last": 0, **(checkpoint or {})},
        "parallel": parallel or {},
        "logging": {"progress_bar": False},
    }


def run_config(cache_dir, save=None, resume=False, **kwargs):
    return build_run_config(raw_config(cache_dir, save, resume, **kwargs))


def copy_checkpoint(source: Path, step: int, target: Path) -> None:
    """A new save folder holding only ``source``'s checkpoint of ``step`` (atomic: a rank waiting
    for ``target`` sees it complete)."""
    import shutil

    tmp = target.with_name(target.name + ".copying")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source / f"iter_{step:07d}", tmp / f"iter_{step:07d}")
    tmp.rename(target)
