"""The run config shared by test_data_parallel.py (single-process reference, in the pytest
process) and data_parallel_worker.py (the torchrun launches): a tiny model with T, M, * and -
layers, TransPoints 0, 13 (mid-chunk) and T = 32, 5 steps of global batch 8 in micro-batches of
2 (4 accumulation steps on one process, 2 per rank at DP = 2)."""

from pathlib import Path

from megatron_transmamba.training.config import build_run_config

MODEL = dict(layer_pattern="T-M-*-T-T-", hidden_size=32, ffn_hidden_size=64, num_attention_heads=8, kv_channels=8,
             num_query_groups=4, mamba_num_heads=8, mamba_num_groups=4, mamba_head_dim=8,
             mamba_state_dim=8, seq_length=32, transpoint_schedule="list",
             transpoint_values=[0, 13, 32], ssd_chunk_size=8)
TRAIN_ITERS = 5


def run_config(out_dir: Path, save: str = None, resume: bool = False, exit_at_step=None,
               model: dict = None, training: dict = None, **parallel):
    return build_run_config({
        "model": {**MODEL, **(model or {})},
        "data": {"cache_dir": str(Path(out_dir) / "data_cache")},
        "training": {"micro_batch_size": 2, "global_batch_size": 8, "train_iters": TRAIN_ITERS,
                     "lr": 3e-3, "min_lr": 3e-4, "lr_warmup_iters": 1, "eval_interval": 0,
                     "log_interval": 100, "exit_at_step": exit_at_step, **(training or {})},
        "checkpoint": {"save": save, "save_interval": 1000, "resume": resume},
        "parallel": parallel,
        "logging": {"progress_bar": False},
    })


def single_process_reference(out_dir, **overrides) -> dict:
    """Losses, gradient norms of steps 1..TRAIN_ITERS and the parameter count of the run
    trained in this process (the parallel layouts' reference)."""
    from megatron_transmamba.training.pretrain import pretrain

    result = pretrain(run_config(out_dir, **overrides))
    return {"losses": [result.train_losses[s] for s in range(1, TRAIN_ITERS + 1)],
            "grad_norms": [result.grad_norms[s] for s in range(1, TRAIN_ITERS + 1)],
            "parameters": result.num_parameters}
