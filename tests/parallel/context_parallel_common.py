"""The run config shared by test_context_parallel_training.py (the CP = 1 reference, in the
pytest process) and context_parallel_worker.py (the torchrun launches): a tiny model with T, M,
* and - layers at T = 32 whose TransPoints 0, 13, 16, 20, 32 fall at the sequence start,
inside the first shard, on the CP = 2 shard boundary (a CP = 4 boundary too), inside a later
shard and at T; RoPE in the mixers and '*' layers; 20 steps of global batch 4 in micro-batches
of 2 (gradient accumulation, and two micro-batches per rank at DP = 2)."""

from pathlib import Path

from megatron_transmamba.training.config import build_run_config

MODEL = dict(layer_pattern="T-M-*-T-T-T-T-", hidden_size=32, ffn_hidden_size=64,
             num_attention_heads=8, kv_channels=8, num_query_groups=4, mamba_num_heads=8,
             mamba_num_groups=4, mamba_head_dim=8, mamba_state_dim=8, seq_length=32,
             transpoint_schedule="list", transpoint_values=[0, 13, 16, 20, 32],
             ssd_chunk_size=4, mixer_position_embedding="rope")
TRAIN_ITERS = 20
STOP_AT = 10


def run_config(out_dir: Path, save: str = None, resume: bool = False, exit_at_step=None,
               **parallel):
    return build_run_config({
        "model": dict(MODEL),
        "data": {"cache_dir": str(Path(out_dir) / "data_cache")},
        "training": {"micro_batch_size": 2, "global_batch_size": 4, "train_iters": TRAIN_ITERS,
                     "lr": 3e-3, "min_lr": 3e-4, "lr_warmup_iters": 2, "eval_interval": 0,
                     "log_interval": 100, "exit_at_step": exit_at_step},
        "checkpoint": {"save": save, "save_interval": STOP_AT, "resume": resume},
        "parallel": parallel,
        "logging": {"progress_bar": False},
    })
