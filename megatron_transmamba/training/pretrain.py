"""``pretrain(run_config)``: what ``examples/pretrain.py`` calls under torchrun.

The run config is checked and the model config built before any process group exists, so a
layout that does not divide the model fails on every rank at once; then the process groups are
set up (``parallel.initialize``), ``Trainer`` (trainer.py) builds and runs the training, and
the groups are torn down. The model math lives in ``megatron_transmamba.models``, the builders
in build.py, the loop in trainer.py; this module also gives their public names, so a script
that builds a model the way the trainer does imports them from one place.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

from megatron_transmamba.parallel.initialize import destroy_distributed, initialize_distributed
from megatron_transmamba.training.build import (build_model_config, build_optimizer,
                                                check_context_parallel, check_run_config,
                                                freeze_unused_parameters, num_microbatches,
                                                pad_vocab_size, pipeline_stages, resolve_bf16,
                                                run_layout, wrap_model, wrap_model_chunks)
from megatron_transmamba.training.config import RunConfig
from megatron_transmamba.training.trainer import (TrainResult, Trainer, TrainingDivergedError,
                                                  lm_forward_step)

__all__ = ["pretrain", "Trainer", "TrainResult", "TrainingDivergedError", "lm_forward_step",
           "build_model_config", "build_optimizer", "check_context_parallel", "check_run_config",
           "freeze_unused_parameters", "num_microbatches", "pad_vocab_size", "pipeline_stages",
           "resolve_bf16", "run_layout", "wrap_model", "wrap_model_chunks"]


def pretrain(cfg: RunConfig) -> TrainResult:
    """Train per ``cfg``; returns the losses seen (on every rank)."""
    start_time = time.time()
    t, p = cfg.training, cfg.parallel
    bf16 = resolve_bf16(t)
    # before any rendezvous: a bad layout fails on every rank at once
    model_config = check_run_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    info = initialize_distributed(tensor_model_parallel_size=p.tensor_model_parallel_size,
                                  pipeline_model_parallel_size=p.pipeline_model_parallel_size,
                                  virtual_pipeline_model_parallel_size=(
                                      p.virtual_pipeline_model_parallel_size),
                                  context_parallel_size=p.context_parallel_size,
                                  seed=t.seed)
    try:
        result = Trainer(cfg, info, model_config, bf16, start_time).run()
    except BaseException:
        if info.world_size > 1:
            # The other ranks may wait in a collective for this one, and tearing down an NCCL
            # group with work pending blocks: report now and leave the rest to the launcher,
            # which stops every rank once one exits.
            print(f"rank {info.rank}: training failed:\n{traceback.format_exc()}",
                  file=sys.stderr, flush=True)
            raise
        destroy_distributed()
        raise
    destroy_distributed()
    return result
