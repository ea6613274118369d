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

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.data.datasets import build_data_loader, build_pretraining_datasets
from megatron_transmamba.data.tokenizer import build_tokenizer
from megatron_transmamba.models.language_model import TransMambaLanguageModel, count_parameters
from megatron_transmamba.parallel.initialize import (destroy_distributed, initialize_distributed,
                                                     validate_layout)
from megatron_transmamba.training import checkpoint as ckpt
from megatron_transmamba.training.config import RunConfig


@dataclass
class TrainResult:
    train_losses: dict = field(default_factory=dict)      # step -> loss
    valid_losses: dict = field(default_factory=dict)      # step -> validation loss
    step_seconds: dict = field(default_factory=dict)      # step -> wall time of the step
    tokens_per_step: int = 0
    initial_valid_loss: Optional[float] = None
    num_parameters: int = 0
    seconds: float = 0.0


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
    return TransMambaConfig(
        **cfg.model,
        tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.parallel.pipeline_model_parallel_size,
        sequence_parallel=cfg.parallel.sequence_parallel,
        bf16=use_bf16, params_dtype=torch.bfloat16 if use_bf16 else torch.float32,
        use_cpu_initialization=True)


def check_run_config(cfg: RunConfig, world_size: int) -> TransMambaConfig:
    """Everything that can be checked before the processes meet: the world size against the
    layout and the model against the layout. Raises ValueError naming the field."""
    p = cfg.parallel
    validate_layout(world_size, p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
    return build_model_config(cfg, resolve_bf16(cfg.training))


def wrap_model(model, model_config: TransMambaConfig, bf16: bool):
    """megatron-core DDP (fp32 grad buffers, no distributed optimizer) around the model."""
    if bf16:
        model = Float16Module(model_config, model)
    model_config.no_sync_func = None
    ddp_model = DistributedDataParallel(
        config=model_config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                 use_distributed_optimizer=False),
        module=model)
    # Called by the schedule after backward: DP all-reduce, and the TP all-reduce of the norm
    # weights' partial gradients under sequence parallelism (their `sequence_parallel` flag).
    model_config.finalize_model_grads_func = finalize_model_grads
    return ddp_model


def build_optimizer(ddp_model, t, bf16: bool, params_dtype: torch.dtype):
    """megatron-core Adam(W) with global-norm clipping and its warmup + decay LR scheduler."""
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
                        clip_grad=t.clip_grad, bf16=bf16, params_dtype=params_dtype),
        [ddp_model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=t.train_iters, lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay,
        end_wd=t.weight_decay, wd_incr_steps=t.train_iters, wd_incr_style="constant")
    return optimizer, scheduler


def lm_forward_step(data_iterator: Iterator, model, device: torch.device):
    """megatron-core forward_step_func: next batch (tokens, labels, loss_mask) -> per-token loss
    and the masked-mean loss function."""
    batch = next(data_iterator)
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True).float()
    losses = model(tokens, labels=labels)                                  # [B, S]

    def loss_func(output):
        loss = (output.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1)
        # megatron-core divides the returned loss in place by the micro-batch count: report a copy
        return loss, {"lm loss": loss.detach().clone()}

    return losses, loss_func


def _mean_loss(loss_dicts: list[dict]) -> float:
    if not loss_dicts:
        return float("nan")
    loss = torch.stack([d["lm loss"] for d in loss_dicts]).mean()
    group = parallel_state.get_data_parallel_group()
    torch.distributed.all_reduce(loss, group=group)
    return loss.item() / torch.distributed.get_world_size(group)


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
    model_config = build_model_config(cfg, bf16)       # before any rendezvous: fails on every rank
    info = initialize_distributed(tensor_model_parallel_size=p.tensor_model_parallel_size,
                                  pipeline_model_parallel_size=p.pipeline_model_parallel_size,
                                  seed=t.seed)
    try:
        return _pretrain(cfg, info, model_config, bf16, start_time)
    finally:
        destroy_distributed()


def _pretrain(cfg: RunConfig, info, model_config: TransMambaConfig, use_bf16: bool,
              start_time: float) -> TrainResult:
    t, p = cfg.training, cfg.parallel
    device = info.device
    rank0 = info.rank == 0
    groups = info.process_groups
    layout = {"world_size": info.world_size,
              "tensor_model_parallel_size": p.tensor_model_parallel_size,
              "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
              "sequence_parallel": p.sequence_parallel}
    dp_size, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    global_batch = t.global_batch_size or t.micro_batch_size * dp_size
    if global_batch % (t.micro_batch_size * dp_size):
        raise ValueError(f"training.global_batch_size={global_batch} must be a multiple of "
                         f"micro_batch_size x data-parallel size = {t.micro_batch_size * dp_size}")
    num_micro = global_batch // (t.micro_batch_size * dp_size)

    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
    vocab_size = pad_vocab_size(tokenizer.vocab_size, t.make_vocab_size_divisible_by,
                                p.tensor_model_parallel_size)
    model = TransMambaLanguageModel(model_config, vocab_size, pg_collection=groups).to(device)
    num_params = count_parameters(model, p.tensor_model_parallel_size)
    ddp_model = wrap_model(model, model_config, use_bf16)
    optimizer, scheduler = build_optimizer(ddp_model, t, use_bf16, model_config.params_dtype)

    step, consumed = 0, 0
    if cfg.checkpoint.resume:
        state = ckpt.load_latest_checkpoint(cfg.checkpoint.save, layout)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            ckpt.set_rng_state(state["rng"])
            step, consumed = state["step"], state["consumed_samples"]
        if rank0:
            print(f"resuming from step {step}" if state else
                  f"no checkpoint in {cfg.checkpoint.save}: starting from scratch", flush=True)

    seq_length = model_config.seq_length
    train_ds, valid_ds, _ = build_pretraining_datasets(
        cfg.data, tokenizer, seq_length,
        (t.train_iters * global_batch, t.eval_iters * t.micro_batch_size * dp_size, 0), t.seed)
    train_loader = build_data_loader(train_ds, consumed, t.micro_batch_size, dp_rank, dp_size,
                                     cfg.data.num_workers)
    train_iter = iter(train_loader)
    forward_backward = partial(get_forward_backward_func(), pg_collection=groups)
    forward_step = partial(lm_forward_step, device=device)

    def evaluate() -> float:
        ddp_model.eval()
        loader = build_data_loader(valid_ds, 0, t.micro_batch_size, dp_rank, dp_size, 0)
        with torch.no_grad():
            out = forward_backward(forward_step_func=lambda it, m: forward_step(it, m),
                                   data_iterator=iter(loader), model=[ddp_model],
                                   num_microbatches=t.eval_iters, seq_length=seq_length,
                                   micro_batch_size=t.micro_batch_size, forward_only=True)
        ddp_model.train()
        return _mean_loss(out)

    result = TrainResult(num_parameters=num_params)
    log = _Logger(cfg, t.train_iters, step, rank0)
    if rank0:
        log.line(f"model: {num_params:,} parameters | pattern {model_config.layer_pattern} | "
                 f"TransPoints {list(model_config.transpoints)} | T={seq_length} | "
                 f"layout TP={p.tensor_model_parallel_size}{' (SP)' if p.sequence_parallel else ''}"
                 f" x DP={dp_size} | "
                 f"{device.type} {'bf16' if use_bf16 else 'fp32'} | global batch {global_batch}")
    if t.eval_interval and step == 0:
        result.initial_valid_loss = evaluate()
        result.valid_losses[0] = result.initial_valid_loss
        log.line(f"step {0:>6} | validation loss {result.initial_valid_loss:.4f}")
        log.scalars(0, **{"loss/validation": result.initial_valid_loss})

    ddp_model.train()
    tic, last_logged = time.time(), step
    result.tokens_per_step = global_batch * seq_length
    while step < t.train_iters:
        step_start = time.time()
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        out = forward_backward(forward_step_func=forward_step, data_iterator=train_iter,
                               model=[ddp_model], num_microbatches=num_micro,
                               seq_length=seq_length, micro_batch_size=t.micro_batch_size,
                               forward_only=False)
        ok, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        step += 1
        consumed += global_batch
        loss = _mean_loss(out)                 # .item() waits for the GPU: the step is done
        result.step_seconds[step] = time.time() - step_start
        result.train_losses[step] = loss
        lr = optimizer.param_groups[0]["lr"]
        log.advance(loss)
        log.scalars(step, **{"loss/train": loss, "lr": lr, "grad_norm": grad_norm or 0.0})
        if step % t.log_interval == 0 or step == t.train_iters:
            elapsed = time.time() - tic
            tokens_per_s = (step - last_logged) * global_batch * seq_length / max(elapsed, 1e-9)
            log.line(f"step {step:>6} | loss {loss:.4f} | lr {lr:.3e} | grad norm "
                     f"{(grad_norm or 0.0):.3f} | {tokens_per_s:,.0f} tokens/s")
            log.scalars(step, **{"throughput/tokens_per_s": tokens_per_s})
            tic, last_logged = time.time(), step
        if t.eval_interval and (step % t.eval_interval == 0 or step == t.train_iters):
            result.valid_losses[step] = evaluate()
            log.line(f"step {step:>6} | validation loss {result.valid_losses[step]:.4f}")
            log.scalars(step, **{"loss/validation": result.valid_losses[step]})
        stopping = step == t.exit_at_step
        if cfg.checkpoint.save and (step % cfg.checkpoint.save_interval == 0
                                    or step == t.train_iters or stopping):
            path = ckpt.save_checkpoint(cfg.checkpoint.save, step, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": ckpt.rng_state(),
                "consumed_samples": consumed, "config": cfg.to_dict()},
                keep_last=cfg.checkpoint.keep_last, layout=layout)
            log.line(f"step {step:>6} | saved {path}")
        if stopping:
            log.line(f"step {step:>6} | stopping (training.exit_at_step)")
            break
    log.close()
    result.seconds = time.time() - start_time
    return result
