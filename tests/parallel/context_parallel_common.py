"""The run config shared by test_context_parallel_training.py (the CP = 1 reference, in the
pytest process) and context_parallel_worker.py (the torchrun launches): a tiny model with T, M,
* and - layers at T = 32 whose TransPoints 0, 13, 16, 20, 32 fall at the sequence start,
inside the first shard, on the CP = 2 shard boundary (a CP = 4 boundary too), inside a later
shard and at T; RoPE in the mixers and '*' layers; 20 steps of global batch 4 in micro-batches
of 2 (gradient accumulation, and two micro-batches per rank at DP = 2), on the fixed corpus of
data_parallel_common.fixed_corpus. ``packed_run_config``:
the same model for ``PACKED_ITERS`` steps on a corpus of short documents with
``data.reset_at_eod`` (several documents per sample, many crossing the CP = 2 boundary)."""

from pathlib import Path

from data_parallel_common import fixed_corpus
from megatron_transmamba.training.config import build_run_config

MODEL = dict(layer_pattern="T-M-*-T-T-T-T-", hidden_size=32, ffn_hidden_size=64,
             num_attention_heads=8, kv_channels=8, num_query_groups=4, mamba_num_heads=8,
             mamba_num_groups=4, mamba_head_dim=8, mamba_state_dim=8, seq_length=32,
             transpoint_schedule="list", transpoint_values=[0, 13, 16, 20, 32],
             ssd_chunk_size=4, mixer_position_embedding="rope")
TRAIN_ITERS = 20
STOP_AT = 10
PACKED_ITERS = 5


def run_config(out_dir: Path, save: str = None, resume: bool = False, exit_at_step=None,
               data: dict = None, train_iters: int = TRAIN_ITERS, **parallel):
    return build_run_config({
        "model": dict(MODEL),
        "data": {"cache_dir": str(Path(out_dir) / "data_cache"),
                 **(data or {"data_path": [fixed_corpus(out_dir)]})},
        "training": {"micro_batch_size": 2, "global_batch_size": 4, "train_iters": train_iters,
                     "lr": 3e-3, "min_lr": 3e-4, "lr_warmup_iters": 2, "eval_interval": 0,
                     "log_interval": 100, "exit_at_step": exit_at_step},
        "checkpoint": {"save": save, "save_interval": STOP_AT, "resume": resume},
        "parallel": parallel,
        "logging": {"progress_bar": False},
    })


def packed_run_config(out_dir: Path, corpus: str, **parallel):
    """``run_config`` on the indexed corpus ``corpus`` with packed documents. Gradients are
    reduced after the backward: one process's packed mixer skips the SSM of a micro-batch whose
    documents are all shorter than the TransPoint, and overlapped reduction would wait for its
    SSM parameters' gradients (megatron-core asserts)."""
    return run_config(out_dir, data={"data_path": [corpus], "split": "95,5,0",
                                     "reset_at_eod": True},
                      train_iters=PACKED_ITERS, overlap_grad_reduce=False, **parallel)
