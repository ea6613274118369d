"""Building a run from its config: the model config with the parallel layout, the checks that
run before any process group exists, the pipeline stages, megatron-core DDP around the model
chunks, the probe that freezes parameters without gradients, and the Megatron optimizer with
its LR schedule. ``Trainer`` (trainer.py) calls these; tests and benchmarks that build a model
the way the trainer does call them too.
"""

from __future__ import annotations

import math
import warnings

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.parallel.initialize import validate_layout
from megatron_transmamba.parallel.pipeline import split_layer_pattern, strip_stage_marks
from megatron_transmamba.training import checkpoint as ckpt
from megatron_transmamba.training.config import RunConfig
from megatron_transmamba.training.graphs import check_compile, check_cuda_graphs
from megatron_transmamba.training.multi_tensor import use_few_kernel_steps


def pad_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Pad to a multiple of lcm(divisible_by, tp_size): the padded vocabulary, and with it the
    model, is the same for every TP size that divides ``divisible_by``."""
    multiple = math.lcm(divisible_by, tp_size)
    return int(math.ceil(vocab_size / multiple) * multiple)


def resolve_bf16(t) -> bool:
    """``training.precision``: bf16 on GPU and fp32 on CPU for ``auto``."""
    on_gpu = torch.cuda.is_available()
    if t.precision == "bf16" and not on_gpu:
        raise ValueError("training.precision='bf16' needs a GPU; use 'fp32' or 'auto' on CPU")
    return t.precision == "bf16" or (t.precision == "auto" and on_gpu)


def build_model_config(cfg: RunConfig, use_bf16: bool) -> TransMambaConfig:
    """The model config with the run's parallel layout; raises ValueError naming the field when
    the layout does not divide the model (heads, groups, FFN, sequence under SP)."""
    p = cfg.parallel
    model = dict(cfg.model)
    if "layer_pattern" in model:                    # '|' marks the pipeline stages
        model["layer_pattern"] = strip_stage_marks(model["layer_pattern"])
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    pipeline = {}
    if p.pipeline_model_parallel_size > 1:
        pipeline = dict(pipeline_dtype=dtype,
                        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size)
        if p.virtual_pipeline_model_parallel_size:
            # batch_p2p_comm=True (the default) swaps activations and gradients on gloo when
            # the previous and next stage are the same rank (docs/parallelism.md).
            pipeline.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    recompute = {}
    if cfg.training.recompute == "selective":
        recompute = dict(recompute_granularity="selective",
                         recompute_modules=list(cfg.training.recompute_modules))
    with warnings.catch_warnings():         # megatron-core's note on Transformer Engine's core_attn
        warnings.filterwarnings("ignore", message=".*core_attn.*")
        return TransMambaConfig(
            **model, **recompute,
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            sequence_parallel=p.sequence_parallel,
            context_parallel_size=p.context_parallel_size,
            bf16=use_bf16, params_dtype=dtype, use_cpu_initialization=True, **pipeline)


def pipeline_stages(cfg: RunConfig, model_config: TransMambaConfig) -> list[range]:
    """The layers of every pipeline stage (PP x virtual size of them), in global indices."""
    p = cfg.parallel
    pattern = cfg.model.get("layer_pattern", model_config.layer_pattern)
    return split_layer_pattern(pattern, p.pipeline_model_parallel_size
                               * (p.virtual_pipeline_model_parallel_size or 1))


def check_run_config(cfg: RunConfig, world_size: int) -> TransMambaConfig:
    """Everything that can be checked before the processes meet: the world size against the
    layout and the model against the layout. Raises ValueError naming the field."""
    p = cfg.parallel
    dp_size = validate_layout(world_size, p.tensor_model_parallel_size,
                              p.pipeline_model_parallel_size, p.context_parallel_size)
    _, num_micro = num_microbatches(cfg.training, dp_size)
    virtual = p.virtual_pipeline_model_parallel_size
    if virtual and num_micro % p.pipeline_model_parallel_size:
        raise ValueError(f"interleaved pipelining needs the micro-batches per step ({num_micro}) "
                         f"to be a multiple of parallel.pipeline_model_parallel_size "
                         f"({p.pipeline_model_parallel_size}); raise training.global_batch_size")
    if virtual and cfg.training.eval_interval and \
            cfg.training.eval_iters % p.pipeline_model_parallel_size:
        raise ValueError(f"interleaved pipelining needs training.eval_iters "
                         f"({cfg.training.eval_iters}) to be a multiple of "
                         f"parallel.pipeline_model_parallel_size ({p.pipeline_model_parallel_size})")
    model_config = build_model_config(cfg, resolve_bf16(cfg.training))
    check_context_parallel(cfg, model_config)
    pipeline_stages(cfg, model_config)
    check_compile(cfg)
    check_cuda_graphs(cfg, model_config, torch.cuda.is_available())
    return model_config


def check_context_parallel(cfg: RunConfig, model_config: TransMambaConfig) -> None:
    """What context parallelism needs of the run; raises ValueError naming the field."""
    p = cfg.parallel
    cp, tp = p.context_parallel_size, p.tensor_model_parallel_size
    if cp == 1:
        return
    T = model_config.seq_length
    if T % cp:
        raise ValueError(f"model.seq_length={T} must be divisible by "
                         f"parallel.context_parallel_size={cp} (one contiguous shard per rank)")
    if p.sequence_parallel and (T // cp) % tp:
        raise ValueError(f"each context-parallel shard ({T} / {cp} = {T // cp} tokens) must be "
                         f"divisible by parallel.tensor_model_parallel_size={tp} under "
                         "parallel.sequence_parallel")
    unsupported = [name for name, on in (
        ("training.compile", cfg.training.compile),
        ("training.cuda_graphs", cfg.training.cuda_graphs)) if on]
    if unsupported:
        raise ValueError(f"parallel.context_parallel_size={cp} does not support "
                         f"{', '.join(unsupported)}=true yet; set it to false or use CP = 1")
    dropout = [name for name in ("hidden_dropout", "attention_dropout")
               if getattr(model_config, name)]
    if dropout:     # every CP rank draws the same masks, one process draws one for all of T
        raise ValueError(f"parallel.context_parallel_size={cp} needs "
                         f"{' and '.join('model.' + n for n in dropout)} = 0")


def num_microbatches(t, dp_size: int) -> tuple[int, int]:
    """(global batch, micro-batches per rank and step): the global batch is micro_batch_size x
    DP x the gradient-accumulation steps. Raises ValueError when it does not divide."""
    global_batch = t.global_batch_size or t.micro_batch_size * dp_size
    if global_batch % (t.micro_batch_size * dp_size):
        raise ValueError(f"training.global_batch_size={global_batch} must be a multiple of "
                         f"training.micro_batch_size x data-parallel size = "
                         f"{t.micro_batch_size} x {dp_size}")
    return global_batch, global_batch // (t.micro_batch_size * dp_size)


def wrap_model(model, model_config: TransMambaConfig, bf16: bool,
               use_distributed_optimizer: bool = False, overlap_grad_reduce: bool = False):
    """megatron-core DDP around one model (see ``wrap_model_chunks``)."""
    return wrap_model_chunks([model], model_config, bf16, use_distributed_optimizer,
                             overlap_grad_reduce)[0]


def wrap_model_chunks(chunks: list, model_config: TransMambaConfig, bf16: bool,
                      use_distributed_optimizer: bool = False,
                      overlap_grad_reduce: bool = False) -> list:
    """megatron-core DDP (fp32 gradient buffers) around each model chunk of this rank (one per
    virtual pipeline stage). With ``overlap_grad_reduce`` the buckets are reduced during the
    last micro-batch's backward (``no_sync`` holds the earlier ones); with
    ``use_distributed_optimizer`` they are reduce-scattered instead of all-reduced, for the
    optimizer's 1/DP shards."""
    ddp_models = []
    for index, model in enumerate(chunks):
        if bf16:
            model = Float16Module(model_config, model)
        ddp_models.append(DistributedDataParallel(
            config=model_config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
                use_distributed_optimizer=use_distributed_optimizer),
            module=model,
            # as Megatron-LM: one bucket for the later chunks, whose backward ends the step
            disable_bucketing=index > 0))
    no_sync = [m.no_sync for m in ddp_models]
    model_config.no_sync_func = ((no_sync[0] if len(no_sync) == 1 else no_sync)
                                 if overlap_grad_reduce else None)
    # Called by the schedule after backward: waits for (or starts) the DP reduction, and the TP
    # all-reduce of the norm weights' partial gradients under sequence parallelism (their
    # `sequence_parallel` flag).
    model_config.finalize_model_grads_func = finalize_model_grads
    return ddp_models


def freeze_unused_parameters(model, vocab_size: int, seq_length: int,
                             device: torch.device) -> list[str]:
    """Freeze the parameters that get no gradient at this sequence length, and name them.

    A ``T`` layer whose TransPoint is T runs attention over the whole sequence, so its SSM-only
    parameters (A_log, dt_bias, D) never get a gradient. Overlapped gradient reduction starts a
    bucket's reduction when every parameter in it reported a gradient, so such a bucket would
    never be reduced (megatron-core asserts). One forward/backward of one sequence finds them;
    they do not affect the loss, so freezing them changes no loss (it only spares them the
    weight decay). The RNG states are restored, so the run is the same as without the probe.
    """
    saved = ckpt.rng_state()
    tokens = torch.randint(0, vocab_size, (1, seq_length), device=device)
    if not model.pre_process:                  # a later pipeline stage: a made-up input
        config = model.config
        rows = seq_length // config.tensor_model_parallel_size if config.sequence_parallel \
            else seq_length
        model.set_input_tensor(torch.randn(rows, 1, config.hidden_size, device=device,
                                           dtype=config.params_dtype))
    model(tokens, labels=tokens).float().sum().backward()
    model.set_input_tensor(None)
    unused = [name for name, param in model.named_parameters()
              if param.requires_grad and param.grad is None]
    for name, param in model.named_parameters():
        param.grad = None
        if name in unused:
            param.requires_grad_(False)
    ckpt.set_rng_state(saved)
    return unused


def build_optimizer(ddp_model, t, bf16: bool, params_dtype: torch.dtype,
                    use_distributed_optimizer: bool = False):
    """megatron-core Adam(W) with global-norm clipping and its warmup + decay LR scheduler."""
    ddp_models = ddp_model if isinstance(ddp_model, list) else [ddp_model]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
                        clip_grad=t.clip_grad, bf16=bf16, params_dtype=params_dtype,
                        use_distributed_optimizer=use_distributed_optimizer),
        ddp_models)
    use_few_kernel_steps(optimizer)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=t.train_iters, lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay,
        end_wd=t.weight_decay, wd_incr_steps=t.train_iters, wd_incr_style="constant")
    return optimizer, scheduler


def run_layout(cfg: RunConfig, info) -> dict:
    """The parallel layout the run really uses: checkpoints store it (and resume compares it),
    ``TrainResult.layout`` starts from it."""
    p = cfg.parallel
    return {"world_size": info.world_size,
            "tensor_model_parallel_size": p.tensor_model_parallel_size,
            "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
            "data_parallel_size": info.data_parallel_size,
            "context_parallel_size": p.context_parallel_size,
            "virtual_pipeline_model_parallel_size": p.virtual_pipeline_model_parallel_size,
            "sequence_parallel": p.sequence_parallel,
            "use_distributed_optimizer": p.use_distributed_optimizer}
