"""The pretraining loop on megatron-core: DDP, the Megatron optimizer, its LR scheduler and
forward/backward schedule, periodic validation, checkpoints, TensorBoard and a progress bar.

``pretrain(run_config)`` is what ``examples/pretrain.py`` calls under torchrun. The model math
lives in ``megatron_transmamba.models``; this file only wires data, optimizer and logging. The
parallel layout comes from the run config's ``parallel`` section: the model config is built
and checked before any process group exists, so a layout that does not divide the model fails
on every rank at once; the model, the schedule and finalize_model_grads get their process
groups from ``initialize_distributed``.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, Optional

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.flops import training_flops_per_token
from megatron_transmamba.data.datasets import build_data_loader, build_pretraining_datasets
from megatron_transmamba.data.tokenizer import build_tokenizer
from megatron_transmamba.models.language_model import TransMambaLanguageModel, count_parameters
from megatron_transmamba.parallel.initialize import (destroy_distributed, initialize_distributed,
                                                     validate_layout)
from megatron_transmamba.parallel.pipeline import rank_stages, split_layer_pattern, strip_stage_marks
from megatron_transmamba.training import checkpoint as ckpt
from megatron_transmamba.training.config import RunConfig
from megatron_transmamba.training.graphs import (capturable_streams, capture_layer_graphs,
                                                 check_compile, check_cuda_graphs, compile_layers)
from megatron_transmamba.training.multi_tensor import (install_foreach_multi_tensor_ops,
                                                       use_few_kernel_steps)
from megatron_transmamba.training.optimizer_step import StepRecords, device_step, skips_on_device
from megatron_transmamba.training.profiling import StepProfiler
from megatron_transmamba.training.metrics import (Throughput, format_bytes, memory_estimate_bytes,
                                                  peak_tflops, throughput)


@dataclass
class TrainResult:
    train_losses: dict = field(default_factory=dict)      # step -> loss
    valid_losses: dict = field(default_factory=dict)      # step -> validation loss
    step_seconds: dict = field(default_factory=dict)      # step -> wall time of the step
    grad_norms: dict = field(default_factory=dict)        # step -> global gradient norm
    tokens_per_step: int = 0
    initial_valid_loss: Optional[float] = None
    throughput: Optional[Throughput] = None              # of the last logging interval
    layout: dict = field(default_factory=dict)           # what the run really used
    num_parameters: int = 0
    seconds: float = 0.0
    flops_per_token: float = 0.0                          # model FLOPs of training (flops.py)
    peak_tflops: Optional[float] = None                   # per GPU, for MFU
    skipped_steps: list = field(default_factory=list)    # NaN/inf steps not applied
    resumed_from: Optional[str] = None                    # the checkpoint folder loaded
    saved: list = field(default_factory=list)             # checkpoint folders completed
    stop_reason: Optional[str] = None                     # 'exit_at_step', 'SIGTERM', or None
    peak_memory_bytes: int = 0                            # max over ranks (CUDA allocator)
    profile: Optional[dict] = None                        # profiled window, per step (profiling.py)


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
    install_foreach_multi_tensor_ops()
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


class TrainingDivergedError(RuntimeError):
    """A NaN/inf loss or gradient norm with training.nan_action='stop' (or too many skips)."""


class _StopSignal:
    """SIGTERM (e.g. SLURM preemption, or torchrun passing it on) sets a flag instead of killing
    the process; the training loop checks it on every rank after each step, saves and stops.
    Later SIGTERMs are ignored too (a job may get one from SLURM and one from torchrun): the
    launcher's SIGKILL after its grace period is the hard stop. Only the main thread can install
    handlers; elsewhere this does nothing."""

    def __init__(self):
        self.received, self._previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False

    def anywhere(self, device: torch.device) -> torch.Tensor:
        """Whether any rank got the signal, as a device flag (a collective: every rank calls
        it); the training loop reads it with the step's loss, one step later."""
        # a fill, not a copy from host memory (which would wait for the device)
        flag = torch.full((1,), 1.0 if self.received else 0.0, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag[0]


def startup_line(cfg: RunConfig, model_config: TransMambaConfig, info, num_params: int,
                 chunks: list, bf16: bool, global_batch: int, num_micro: int) -> str:
    """Layout (TP x PP x CP x DP), model size and this rank's static memory estimate."""
    p = cfg.parallel
    local = sum(param.numel() for chunk in chunks for param in chunk.parameters())
    memory = memory_estimate_bytes(local, bf16, info.data_parallel_size,
                                   p.use_distributed_optimizer)
    return (f"layout TP={p.tensor_model_parallel_size}{' (SP)' if p.sequence_parallel else ''} x "
            f"PP={p.pipeline_model_parallel_size}"
            f"{f' (virtual {p.virtual_pipeline_model_parallel_size})' if p.virtual_pipeline_model_parallel_size else ''}"
            f"{f' x CP={p.context_parallel_size}' if p.context_parallel_size > 1 else ''}"
            f" x DP={info.data_parallel_size} = "
            f"{info.world_size} ranks ({info.backend}, {info.device.type}, "
            f"{'bf16' if bf16 else 'fp32'}) | model {num_params / 1e6:,.2f}M parameters, pattern "
            f"{model_config.layer_pattern}, TransPoints {list(model_config.transpoints)}, "
            f"T={model_config.seq_length} | global batch {global_batch} = micro "
            f"{cfg.training.micro_batch_size} x {num_micro} accumulation x DP "
            f"{info.data_parallel_size} | rank 0 layers "
            f"{', '.join(f'{c.layer_range.start}-{c.layer_range.stop - 1}' for c in chunks)} | "
            f"per rank: {local / 1e6:,.2f}M parameters, memory "
            f"{format_bytes(memory['total'])} (weights {format_bytes(memory['weights'])}, grads "
            f"{format_bytes(memory['gradients'])}, optimizer {format_bytes(memory['optimizer'])}"
            f"{' sharded' if p.use_distributed_optimizer else ''}; activations not included)")


def lm_forward_step(data_iterator: Iterator, model, device: torch.device, cp_group=None):
    """megatron-core forward_step_func: next batch (tokens, labels, loss_mask) -> per-token loss
    and the masked-mean loss function. A batch with ``cu_seqlens`` (``data.reset_at_eod``)
    runs its documents apart; every pipeline stage reads the same batch, so each gets them.

    Context parallelism (``cp_group`` of R > 1 ranks): every rank of the group reads the same
    batch and keeps its contiguous shard of T / R tokens, and passes the whole micro-batch's
    ``cu_seqlens`` (the model takes its shard of the documents); the loss is this shard's masked
    sum over the mask's sum on all shards (one all-reduce), so the R shards' losses add up to
    the full sequence's. megatron-core's schedule multiplies the loss by R before backward, which
    DDP's average over the data- and context-parallel ranks undoes."""
    batch = next(data_iterator)
    shard = slice(None)
    cp_size = torch.distributed.get_world_size(cp_group) if cp_group is not None else 1
    if cp_size > 1:
        length = batch["tokens"].shape[1] // cp_size
        start = torch.distributed.get_rank(cp_group) * length
        shard = slice(start, start + length)
    tokens = batch["tokens"][:, shard].to(device, non_blocking=True)
    labels = batch["labels"][:, shard].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"][:, shard].to(device, non_blocking=True).float()
    packed = {}
    if "cu_seqlens" in batch:
        packed["cu_seqlens"] = batch["cu_seqlens"].to(device, non_blocking=True)
    losses = model(tokens, labels=labels, **packed)                       # [B, S]

    def loss_func(output):
        count = loss_mask.sum()
        if cp_size > 1:                                 # the mask's sum over every shard
            torch.distributed.all_reduce(count, group=cp_group)
        loss = (output.float() * loss_mask).sum() / count.clamp(min=1)
        # megatron-core divides the returned loss in place by the micro-batch count: report a copy
        return loss, {"lm loss": loss.detach().clone()}

    return losses, loss_func


def _mean_loss(loss_dicts: list[dict], pp_group, dp_cp_group, dp_size: int) -> torch.Tensor:
    """The loss averaged over micro-batches and DP ranks, on the device (0-d): summed over the
    data- and context-parallel ranks (a CP shard's loss is its part of the sequence's,
    ``lm_forward_step``) and divided by DP. Only the last pipeline stage has it, so it is
    summed over the pipeline group (the other stages add 0)."""
    if loss_dicts:
        loss = torch.stack([d["lm loss"] for d in loss_dicts]).mean()
        torch.distributed.all_reduce(loss, group=dp_cp_group)
        loss = loss / dp_size
    else:
        loss = torch.zeros((), device=pp_device())
    if torch.distributed.get_world_size(pp_group) > 1:
        torch.distributed.all_reduce(loss, group=pp_group)
    return loss.float()


def pp_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


class _Logger:
    """Rank-0 progress bar, log lines and TensorBoard scalars."""

    def __init__(self, cfg: RunConfig, total: int, start: int, enabled: bool):
        self.enabled = enabled
        self.bar = self.writer = None
        if not enabled:
            return
        if cfg.logging.progress_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
        tb_dir = cfg.logging.tensorboard_dir or (
            os.path.join(cfg.checkpoint.save, "tensorboard") if cfg.checkpoint.save else None)
        if tb_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(tb_dir)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def scalars(self, step: int, **values) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def advance(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


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
        result = _pretrain(cfg, info, model_config, bf16, start_time)
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


def _pretrain(cfg: RunConfig, info, model_config: TransMambaConfig, use_bf16: bool,
              start_time: float) -> TrainResult:
    t, p = cfg.training, cfg.parallel
    device = info.device
    rank0 = info.rank == 0
    groups = info.process_groups
    layout = {"world_size": info.world_size,
              "tensor_model_parallel_size": p.tensor_model_parallel_size,
              "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
              "data_parallel_size": info.data_parallel_size,
              "context_parallel_size": p.context_parallel_size,
              "virtual_pipeline_model_parallel_size": p.virtual_pipeline_model_parallel_size,
              "sequence_parallel": p.sequence_parallel,
              "use_distributed_optimizer": p.use_distributed_optimizer}
    dp_size, dp_rank = groups.dp.size(), groups.dp.rank()     # data parallelism without CP
    global_batch, num_micro = num_microbatches(t, dp_size)

    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
    vocab_size = pad_vocab_size(tokenizer.vocab_size, t.make_vocab_size_divisible_by,
                                p.tensor_model_parallel_size)
    stages = pipeline_stages(cfg, model_config)
    pp_rank, pp_size = groups.pp.rank(), p.pipeline_model_parallel_size
    chunks = [TransMambaLanguageModel(model_config, vocab_size, pg_collection=groups,
                                      layer_range=stages[stage], pre_process=stage == 0,
                                      post_process=stage == len(stages) - 1,
                                      init_seed=t.seed, recompute=t.recompute == "full",
                                      vp_stage=(chunk if p.virtual_pipeline_model_parallel_size
                                                else None)).to(device)
              for chunk, stage in enumerate(
                  rank_stages(pp_rank, pp_size, p.virtual_pipeline_model_parallel_size))]
    num_params = torch.tensor(float(sum(count_parameters(c, p.tensor_model_parallel_size)
                                        for c in chunks)), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(num_params, group=groups.pp)
    num_params = int(num_params.item())
    startup = {"model": time.time() - start_time}         # seconds since pretrain() began
    frozen = [name for c in chunks
              for name in freeze_unused_parameters(
                  c, vocab_size, model_config.seq_length // p.context_parallel_size, device)
              ] if p.overlap_grad_reduce else []
    if t.compile and not t.cuda_graphs:        # with CUDA graphs, the captured layers compile
        compile_layers(chunks, t.compile_fullgraph)
    with capturable_streams(t.cuda_graphs):
        ddp_models = wrap_model_chunks(chunks, model_config, use_bf16,
                                       p.use_distributed_optimizer, p.overlap_grad_reduce)
    startup["probe"] = time.time() - start_time          # includes Triton compilation
    optimizer, scheduler = build_optimizer(ddp_models, t, use_bf16, model_config.params_dtype,
                                           p.use_distributed_optimizer)

    checkpointer = None
    if cfg.checkpoint.save:
        c = cfg.checkpoint
        checkpointer = ckpt.Checkpointer(
            c.save, groups, layout, cfg.to_dict(), model_config.seq_length, keep_last=c.keep_last,
            async_save=c.async_save, checksums=c.verify_checksums,
            log=(lambda text: print(text, flush=True)) if rank0 else (lambda text: None))
        checkpointer.remove_incomplete()
    step, consumed, resumed = 0, 0, None
    if cfg.checkpoint.resume:
        resumed = checkpointer.load(chunks, optimizer, scheduler)
        if resumed is not None:
            step, consumed = resumed.step, resumed.consumed_samples
        if rank0:
            if resumed is None:
                print(f"no checkpoint in {cfg.checkpoint.save}: starting from scratch", flush=True)
            elif resumed.model_only:
                # e.g. imported from Hugging Face (tools/hf/convert.py import): continued
                # pretraining from these weights with a fresh optimizer, schedule and data order
                print(f"starting from the weights of the model-only checkpoint {resumed.path} "
                      "(fresh optimizer, step 0)", flush=True)
            else:
                print(f"resuming from step {step} ({resumed.path})", flush=True)
            for note in (resumed.notes if resumed else []):
                print(note, flush=True)

    if t.cuda_graphs:          # parameters are where they stay: after DDP, optimizer, resume
        capture_layer_graphs(chunks, t.micro_batch_size, device,
                             t.compile_fullgraph if t.compile else None)
        startup["graphs"] = time.time() - start_time

    seq_length = model_config.seq_length
    train_ds, valid_ds, _ = build_pretraining_datasets(
        cfg.data, tokenizer, seq_length,
        (t.train_iters * global_batch, t.eval_iters * t.micro_batch_size * dp_size, 0), t.seed)
    startup["data"] = time.time() - start_time

    def iterators(dataset, consumed_samples, num_workers):
        """One iterator per model chunk (the interleaved schedule reads each chunk's own);
        every stage reads the same batches (the first uses the tokens, the last the labels)."""
        its = [iter(build_data_loader(dataset, consumed_samples, t.micro_batch_size, dp_rank,
                                      dp_size, num_workers)) for _ in chunks]
        return its if len(its) > 1 else its[0]

    train_iter = iterators(train_ds, consumed, cfg.data.num_workers)
    schedule = {"pg_collection": groups}
    if p.pipeline_model_parallel_size > 1:
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
        schedule["p2p_communicator"] = P2PCommunicator(groups.pp, model_config)
    forward_backward = partial(get_forward_backward_func(), **schedule)
    forward_step = partial(lm_forward_step, device=device, cp_group=groups.cp)

    def evaluate() -> float:
        for m in ddp_models:
            m.eval()
        with torch.no_grad():
            out = forward_backward(forward_step_func=lambda it, m: forward_step(it, m),
                                   data_iterator=iterators(valid_ds, 0, 0), model=ddp_models,
                                   num_microbatches=t.eval_iters, seq_length=seq_length,
                                   micro_batch_size=t.micro_batch_size, forward_only=True)
        for m in ddp_models:
            m.train()
        return _mean_loss(out, groups.pp, groups.dp_cp, dp_size).item()

    result = TrainResult(num_parameters=num_params, layout={
        "world_size": info.world_size, "tensor_model_parallel_size": info.tensor_model_parallel_size,
        "pipeline_model_parallel_size": info.pipeline_model_parallel_size,
        "data_parallel_size": dp_size, "context_parallel_size": info.context_parallel_size,
        "num_microbatches": num_micro,
        "optimizer": [type(o).__name__ for o in getattr(optimizer, "chained_optimizers", [optimizer])],
        "overlap_grad_reduce": ddp_models[0].ddp_config.overlap_grad_reduce,
        "virtual_pipeline_model_parallel_size": p.virtual_pipeline_model_parallel_size,
        "compile": t.compile, "cuda_graphs": t.cuda_graphs,
        "recompute": (f"selective ({', '.join(t.recompute_modules)})"
                      if t.recompute == "selective" else t.recompute),
        "stage_layers": [[r.start, r.stop] for r in stages],
        "rank_layers": [list(c.layer_range) for c in chunks],
        "layer_numbers": [[layer.layer_number for layer in c.layers] for c in chunks]})
    log = _Logger(cfg, t.train_iters, step, rank0)
    flops_per_token = training_flops_per_token(model_config, vocab_size)
    peak = peak_tflops(cfg.logging.peak_tflops, use_bf16, device)
    if rank0:
        log.line(startup_line(cfg, model_config, info, num_params, chunks, use_bf16,
                              global_batch, num_micro))
        if frozen:
            log.line(f"frozen (no gradient at T={seq_length}, see freeze_unused_parameters): "
                     f"{', '.join(frozen)}")
        log.line("start-up seconds (cumulative): " + ", ".join(
            f"{name} {seconds:.1f}" for name, seconds in startup.items()))
    if t.eval_interval and step == 0:
        result.initial_valid_loss = evaluate()
        result.valid_losses[0] = result.initial_valid_loss
        log.line(f"step {0:>6} | validation loss {result.initial_valid_loss:.4f}")
        log.scalars(0, **{"loss/validation": result.initial_valid_loss})

    for m in ddp_models:
        m.train()
    tic, last_logged = time.time(), step
    result.tokens_per_step = global_batch * seq_length
    result.resumed_from = resumed.path if resumed is not None else None

    def save(at_step: int, samples: int) -> None:
        path = checkpointer.save(at_step, samples, chunks, optimizer, scheduler)
        if cfg.checkpoint.async_save:
            log.line(f"step {at_step:>6} | saving {path} in the background")
        else:
            result.saved.append(path)
            log.line(f"step {at_step:>6} | saved {path}")

    def finish_saves(blocking: bool) -> None:
        """Complete the asynchronous saves whose writers are done (all of them if blocking)."""
        if checkpointer is not None:
            for path in checkpointer.wait() if blocking else checkpointer.poll():
                result.saved.append(path)
                log.line(f"checkpoint {path} complete")

    skipped_in_a_row, last_saved = 0, (resumed.step if resumed is not None else None)
    profiler = StepProfiler(cfg.logging, info.rank, partial(print, flush=True), default_dir=(
        os.path.join(cfg.checkpoint.save, "profile") if cfg.checkpoint.save else "runs/profile"))
    if not skips_on_device(optimizer):
        raise ValueError("the training step needs torch's fused Adam(W) (found_inf), which "
                         "build_optimizer sets up")
    records = StepRecords(device)        # each step's [loss, grad norm, SIGTERM], read a step late

    def settle() -> None:
        """The host's part of the oldest queued step: its losses and logs, the LR schedule when
        its update was applied, the NaN/inf policy (which raises) and SIGTERM."""
        nonlocal skipped_in_a_row
        at, (loss, grad_norm, stop_requested) = records.pop()
        if not math.isfinite(loss):
            grad_norm = float("nan")
        result.train_losses[at], result.grad_norms[at] = loss, grad_norm
        log.advance(loss)
        log.scalars(at, **{"loss/train": loss, "lr": optimizer.param_groups[0]["lr"],
                           "grad_norm": grad_norm})
        if stop_requested and not result.stop_reason:
            result.stop_reason = "SIGTERM"
        if math.isfinite(loss) and math.isfinite(grad_norm):
            scheduler.step(increment=1)
            skipped_in_a_row = 0
            return
        skipped_in_a_row += 1
        result.skipped_steps.append(at)
        what = f"step {at}: loss {loss}, gradient norm {grad_norm}"
        if t.nan_action == "stop" or skipped_in_a_row == t.nan_skip_limit:
            # Nothing was applied since: weights, optimizer and schedule are those of `at - 1`
            # (the device skipped step `at`; the next update is not queued yet).
            good = at - 1
            saved = ""
            if checkpointer is not None:
                finish_saves(blocking=True)
                if last_saved != good:
                    save(good, good * global_batch)
                    finish_saves(blocking=True)
                saved = (f"; the last good state (step {good}) is the checkpoint "
                         f"iter_{good:07d} in {cfg.checkpoint.save}")
            reason = ("training.nan_action='stop'" if t.nan_action == "stop" else
                      f"{skipped_in_a_row} steps in a row (training.nan_skip_limit)")
            raise TrainingDivergedError(
                f"{what} is not finite ({reason}){saved}. Resuming repeats this batch; "
                "training.nan_action='skip' skips it, a lower training.lr or "
                "training.clip_grad may avoid it")
        log.line(f"step {at:>6} | {what} is not finite: update skipped "
                 f"(training.nan_action='skip', {skipped_in_a_row} in a row)")

    with _StopSignal() as stop_signal:
        while step < t.train_iters:
            profiler.begin(step + 1)
            step_start = time.time()
            for m in ddp_models:
                m.zero_grad_buffer()
            optimizer.zero_grad()
            out = forward_backward(forward_step_func=forward_step, data_iterator=train_iter,
                                   model=ddp_models, num_microbatches=num_micro,
                                   seq_length=seq_length, micro_batch_size=t.micro_batch_size,
                                   forward_only=False)
            loss = _mean_loss(out, groups.pp, groups.dp_cp, dp_size)  # the same on every rank
            stop_flag = stop_signal.anywhere(device)
            # The previous step's outcome: the device has this step queued behind it, so the
            # wait does not idle it. A skipped step is known here, before the next update.
            if records:
                settle()
                if result.stop_reason:   # SIGTERM during the previous step: this batch is dropped
                    break
            records.push(step + 1, device_step(optimizer, loss, stop_flag, device))
            step += 1
            consumed += global_batch
            at_log = step % t.log_interval == 0 or step == t.train_iters
            at_eval = t.eval_interval and (step % t.eval_interval == 0 or step == t.train_iters)
            at_save = checkpointer is not None and step % cfg.checkpoint.save_interval == 0
            if at_log or at_eval or at_save or step == t.exit_at_step:
                settle()                           # this step's outcome, waiting for it
            result.step_seconds[step] = time.time() - step_start
            profiler.end(step)
            if at_log:
                elapsed = time.time() - tic
                speed = throughput((step - last_logged) * global_batch * seq_length, elapsed,
                                   flops_per_token, info.world_size, peak)
                result.throughput = speed
                log.line(f"step {step:>6} | loss {result.train_losses[step]:.4f} | lr "
                         f"{optimizer.param_groups[0]['lr']:.3e} | grad norm "
                         f"{result.grad_norms[step]:.3f} | {speed.describe()}")
                log.scalars(step, **{"throughput/tokens_per_s": speed.tokens_per_s,
                                     "throughput/tflops_per_gpu": speed.tflops_per_gpu,
                                     **({"throughput/mfu": speed.mfu} if speed.mfu is not None
                                        else {})})
                tic, last_logged = time.time(), step
            if at_eval:
                result.valid_losses[step] = evaluate()
                log.line(f"step {step:>6} | validation loss {result.valid_losses[step]:.4f}")
                log.scalars(step, **{"loss/validation": result.valid_losses[step]})
            finish_saves(blocking=False)
            if step == t.exit_at_step:
                result.stop_reason = "exit_at_step"
            if result.stop_reason:
                break
            if at_save:
                save(step, consumed)
                last_saved = step
        while records:
            settle()
        if checkpointer is not None and last_saved != step and (
                result.stop_reason or step == t.train_iters):
            save(step, consumed)
            last_saved = step
        if result.stop_reason:
            log.line(f"step {step:>6} | stopping ({result.stop_reason})")
        finish_saves(blocking=True)
    result.flops_per_token, result.peak_tflops = flops_per_token, peak
    result.profile = profiler.stats
    if device.type == "cuda":
        peak_memory = torch.tensor(torch.cuda.max_memory_allocated(device), device=device)
        torch.distributed.all_reduce(peak_memory, op=torch.distributed.ReduceOp.MAX)
        result.peak_memory_bytes = int(peak_memory.item())
        log.line(f"peak memory per GPU (max over ranks): {format_bytes(result.peak_memory_bytes)}")
    log.close()
    result.seconds = time.time() - start_time
    return result
