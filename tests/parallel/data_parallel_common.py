"""The run config shared by test_data_parallel.py (single-process reference, in the pytest
process) and data_parallel_worker.py (the torchrun launches): a tiny model with T, M, * and -
layers, TransPoints 0, 13 (mid-chunk) and T = 32, 5 steps of global batch 8 in micro-batches of
2 (4 accumulation steps on one process, 2 per rank at DP = 2), on the fixed corpus of
``fixed_corpus``."""

import sys
from pathlib import Path

from megatron_transmamba.training.config import build_run_config

MODEL = dict(layer_pattern="T-M-*-T-T-", hidden_size=32, ffn_hidden_size=64, num_attention_heads=8, kv_channels=8,
             num_query_groups=4, mamba_num_heads=8, mamba_num_groups=4, mamba_head_dim=8,
             mamba_state_dim=8, seq_length=32, transpoint_schedule="list",
             transpoint_values=[0, 13, 32], ssd_chunk_size=8)
TRAIN_ITERS = 5
TIED = {"share_embeddings_and_output_weights": True}
# the fixed corpus: seeded documents of 1 to 160 characters of these, the same bytes on every
# machine and Python (the embedded corpus is the interpreter's standard library)
CORPUS_ALPHABET, CORPUS_MAX_LENGTH, CORPUS_DOCUMENTS = "abcdefghijklmnopqrstuvwxyz   \n", 160, 400


def fixed_corpus(out_dir: Path) -> str:
    """The indexed fixed corpus of the runs in ``out_dir``, built there by the first caller
    (every rank may: build_indexed_dataset writes under a name of its own and moves the files
    into place, and all of them write the same bytes)."""
    prefix = Path(out_dir) / "corpus" / "docs"
    if not prefix.with_suffix(".idx").exists():
        tests = str(Path(__file__).resolve().parents[1])
        if tests not in sys.path:        # a torchrun worker has only this folder
            sys.path.append(tests)
        from helpers import short_documents_corpus
        short_documents_corpus(str(prefix), CORPUS_ALPHABET, CORPUS_MAX_LENGTH, CORPUS_DOCUMENTS)
    return str(prefix)


def run_config(out_dir: Path, save: str = None, resume: bool = False, exit_at_step=None,
               model: dict = None, training: dict = None, **parallel):
    return build_run_config({
        "model": {**MODEL, **(model or {})},
        "data": {"cache_dir": str(Path(out_dir) / "data_cache"),
                 "data_path": [fixed_corpus(out_dir)]},
        "training": {"micro_batch_size": 2, "global_batch_size": 8, "train_iters": TRAIN_ITERS,
                     "lr": 3e-3, "min_lr": 3e-4, "lr_warmup_iters": 1, "eval_interval": 0,
                     "log_interval": 100, "exit_at_step": exit_at_step, **(training or {})},
        "checkpoint": {"save": save, "save_interval": 1000, "resume": resume},
        "parallel": parallel,
        "logging": {"progress_bar": False},
    })
