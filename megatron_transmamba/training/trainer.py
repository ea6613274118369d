"""The training loop on megatron-core: ``Trainer(cfg, info, model_config, bf16).run()``.

``Trainer.__init__`` builds the run (model chunks, DDP, optimizer and LR schedule, checkpointer
and resume, CUDA graphs, datasets) with the functions of build.py; ``train_step`` queues one
optimizer step on the device and settles the one before it; ``evaluate`` is one validation
pass; ``run`` is the loop. Policy lives in the object that owns it: save intervals, keep-last,
asynchronous saves and resume in ``checkpoint.Checkpointer``, the NaN/inf stop-or-skip rule in
``DivergencePolicy``, SIGTERM in ``StopSignal``. The host reads each step's loss one step late
(``optimizer_step.StepRecords``), so it never waits for the device it is feeding.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, Optional

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.data.datasets import build_data_loader, build_pretraining_datasets
from megatron_transmamba.data.tokenizer import build_tokenizer
from megatron_transmamba.flops import training_flops_per_token
from megatron_transmamba.models.language_model import TransMambaLanguageModel, count_parameters
from megatron_transmamba.parallel.pipeline import rank_stages
from megatron_transmamba.training import checkpoint as ckpt
from megatron_transmamba.training.build import (build_optimizer, freeze_unused_parameters,
                                                num_microbatches, pad_vocab_size,
                                                pipeline_stages, run_layout, wrap_model_chunks)
from megatron_transmamba.training.config import RunConfig
from megatron_transmamba.training.graphs import (capturable_streams, capture_layer_graphs,
                                                 compile_layers)
from megatron_transmamba.training.metrics import (Throughput, format_bytes, memory_estimate_bytes,
                                                  peak_tflops, throughput)
from megatron_transmamba.training.optimizer_step import StepRecords, device_step, skips_on_device
from megatron_transmamba.training.profiling import StepProfiler


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


class TrainingDivergedError(RuntimeError):
    """A NaN/inf loss or gradient norm with training.nan_action='stop' (or too many skips)."""


class StopSignal:
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


class DivergencePolicy:
    """``training.nan_action``: a step whose loss or gradient norm is not finite was skipped on
    the device (``optimizer_step.device_step``); ``'skip'`` goes on until
    ``training.nan_skip_limit`` such steps in a row, ``'stop'`` stops at the first."""

    def __init__(self, nan_action: str, nan_skip_limit: int):
        self.nan_action, self.nan_skip_limit = nan_action, nan_skip_limit
        self.in_a_row = 0

    def applied(self) -> None:
        self.in_a_row = 0

    def skipped(self) -> Optional[str]:
        """Count a skipped step; the reason to stop, or None to go on."""
        self.in_a_row += 1
        if self.nan_action == "stop":
            return "training.nan_action='stop'"
        if self.in_a_row == self.nan_skip_limit:
            return f"{self.in_a_row} steps in a row (training.nan_skip_limit)"
        return None


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


def mean_loss(loss_dicts: list[dict], pp_group, dp_cp_group, dp_size: int) -> torch.Tensor:
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


class Logger:
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


class Trainer:
    """One training run on this rank; every process group comes from ``info.process_groups``."""

    def __init__(self, cfg: RunConfig, info, model_config: TransMambaConfig, bf16: bool,
                 start_time: Optional[float] = None):
        self.cfg, self.info, self.model_config, self.bf16 = cfg, info, model_config, bf16
        self.start_time = start_time if start_time is not None else time.time()
        t, p = cfg.training, cfg.parallel
        self.device, self.groups = info.device, info.process_groups
        self.dp_size, self.dp_rank = self.groups.dp.size(), self.groups.dp.rank()  # without CP
        self.global_batch, self.num_micro = num_microbatches(t, self.dp_size)
        self.seq_length = model_config.seq_length
        self.layout = run_layout(cfg, info)
        self.startup = {}                       # seconds since pretrain() began, per phase
        self._build_model()
        self.optimizer, self.scheduler = build_optimizer(
            self.ddp_models, t, bf16, model_config.params_dtype, p.use_distributed_optimizer)
        if not skips_on_device(self.optimizer):
            raise ValueError("the training step needs torch's fused Adam(W) (found_inf), which "
                             "build_optimizer sets up")
        self.step = self.consumed = 0
        self.checkpointer, self.resumed = self._resume()
        if t.cuda_graphs:      # parameters are where they stay: after DDP, optimizer, resume
            capture_layer_graphs(self.chunks, t.micro_batch_size, self.device,
                                 t.compile_fullgraph if t.compile else None)
            self.startup["graphs"] = time.time() - self.start_time
        self._build_data()
        self.result = self._new_result()
        self.log = Logger(cfg, t.train_iters, self.step, info.rank == 0)
        self.flops_per_token = training_flops_per_token(model_config, self.vocab_size)
        self.peak_tflops = peak_tflops(cfg.logging.peak_tflops, bf16, self.device)
        self.divergence = DivergencePolicy(t.nan_action, t.nan_skip_limit)
        self.records = StepRecords(self.device)  # each step's [loss, grad norm, SIGTERM], a step late
        self.profiler = StepProfiler(cfg.logging, info.rank, partial(print, flush=True),
                                     default_dir=os.path.join(cfg.checkpoint.save, "profile")
                                     if cfg.checkpoint.save else "runs/profile")

    # ---- the loop
    def run(self) -> TrainResult:
        """Train to ``training.train_iters`` (or ``exit_at_step``, SIGTERM, divergence)."""
        t = self.cfg.training
        self._announce()
        if t.eval_interval and self.step == 0:
            self.result.initial_valid_loss = self._validate(0)
        for m in self.ddp_models:
            m.train()
        self._interval_start, self._interval_first = time.time(), self.step
        with StopSignal() as stop_signal:
            while self.step < t.train_iters:
                self.profiler.begin(self.step + 1)
                started = time.time()
                if not self.train_step(stop_signal) or self._after_step(started):
                    break
            while self.records:
                self._settle()
            self._save_at_end()
        return self._finish()

    def train_step(self, stop_signal: StopSignal) -> bool:
        """Queue one optimizer step on the device, then settle the previous one (the device has
        this step queued behind it, so the wait does not idle it; a skipped step is known
        before the next update). False, with nothing queued, when SIGTERM arrived during the
        previous step: this batch is dropped."""
        t = self.cfg.training
        for m in self.ddp_models:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        out = self.forward_backward(forward_step_func=self.forward_step,
                                    data_iterator=self.train_iter, model=self.ddp_models,
                                    num_microbatches=self.num_micro, seq_length=self.seq_length,
                                    micro_batch_size=t.micro_batch_size, forward_only=False)
        loss = mean_loss(out, self.groups.pp, self.groups.dp_cp, self.dp_size)  # on every rank
        stop_flag = stop_signal.anywhere(self.device)
        if self.records:
            self._settle()
            if self.result.stop_reason:
                return False
        self.records.push(self.step + 1, device_step(self.optimizer, loss, stop_flag,
                                                     self.device))
        self.step += 1
        self.consumed += self.global_batch
        return True

    def evaluate(self) -> float:
        """The validation loss over ``training.eval_iters`` micro-batches (from the start of the
        validation set every time)."""
        t = self.cfg.training
        for m in self.ddp_models:
            m.eval()
        with torch.no_grad():
            out = self.forward_backward(forward_step_func=lambda it, m: self.forward_step(it, m),
                                        data_iterator=self._iterators(self.valid_ds, 0, 0),
                                        model=self.ddp_models, num_microbatches=t.eval_iters,
                                        seq_length=self.seq_length,
                                        micro_batch_size=t.micro_batch_size, forward_only=True)
        for m in self.ddp_models:
            m.train()
        return mean_loss(out, self.groups.pp, self.groups.dp_cp, self.dp_size).item()

    # ---- after each step: logs, validation and saves at their intervals
    def _after_step(self, started: float) -> bool:
        """The step's host work; True to stop."""
        t, step = self.cfg.training, self.step
        at_log = step % t.log_interval == 0 or step == t.train_iters
        at_eval = t.eval_interval and (step % t.eval_interval == 0 or step == t.train_iters)
        at_save = self.checkpointer is not None and self.checkpointer.due(step)
        if at_log or at_eval or at_save or step == t.exit_at_step:
            self._settle()                                  # this step's outcome, waiting for it
        self.result.step_seconds[step] = time.time() - started
        self.profiler.end(step)
        if at_log:
            self._log_progress()
        if at_eval:
            self._validate(step)
        self._collect_saves(blocking=False)
        if step == t.exit_at_step:
            self.result.stop_reason = "exit_at_step"
        if self.result.stop_reason:
            return True
        if at_save:
            self._save(step, self.consumed)
        return False

    def _settle(self) -> None:
        """The host's part of the oldest queued step: its losses and logs, the LR schedule when
        its update was applied, the NaN/inf policy (which raises) and SIGTERM."""
        at, (loss, grad_norm, stop_requested) = self.records.pop()
        if not math.isfinite(loss):
            grad_norm = float("nan")
        self.result.train_losses[at], self.result.grad_norms[at] = loss, grad_norm
        self.log.advance(loss)
        self.log.scalars(at, **{"loss/train": loss,
                                "lr": self.optimizer.param_groups[0]["lr"],
                                "grad_norm": grad_norm})
        if stop_requested and not self.result.stop_reason:
            self.result.stop_reason = "SIGTERM"
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.scheduler.step(increment=1)
            self.divergence.applied()
            return
        self.result.skipped_steps.append(at)
        what = f"step {at}: loss {loss}, gradient norm {grad_norm}"
        reason = self.divergence.skipped()
        if reason is None:
            self.log.line(f"step {at:>6} | {what} is not finite: update skipped (training."
                          f"nan_action='skip', {self.divergence.in_a_row} in a row)")
            return
        # Nothing was applied since: weights, optimizer and schedule are those of `at - 1` (the
        # device skipped step `at`; the next update is not queued yet).
        good, saved = at - 1, ""
        if self.checkpointer is not None:
            self._collect_saves(blocking=True)
            if self.checkpointer.last_saved != good:
                self._save(good, good * self.global_batch)
                self._collect_saves(blocking=True)
            saved = (f"; the last good state (step {good}) is the checkpoint iter_{good:07d} in "
                     f"{self.cfg.checkpoint.save}")
        raise TrainingDivergedError(
            f"{what} is not finite ({reason}){saved}. Resuming repeats this batch; "
            "training.nan_action='skip' skips it, a lower training.lr or training.clip_grad "
            "may avoid it")

    def _log_progress(self) -> None:
        step, elapsed = self.step, time.time() - self._interval_start
        speed = throughput((step - self._interval_first) * self.global_batch * self.seq_length,
                           elapsed, self.flops_per_token, self.info.world_size, self.peak_tflops)
        self.result.throughput = speed
        self.log.line(f"step {step:>6} | loss {self.result.train_losses[step]:.4f} | lr "
                      f"{self.optimizer.param_groups[0]['lr']:.3e} | grad norm "
                      f"{self.result.grad_norms[step]:.3f} | {speed.describe()}")
        self.log.scalars(step, **{"throughput/tokens_per_s": speed.tokens_per_s,
                                  "throughput/tflops_per_gpu": speed.tflops_per_gpu,
                                  **({"throughput/mfu": speed.mfu} if speed.mfu is not None
                                     else {})})
        self._interval_start, self._interval_first = time.time(), step

    def _validate(self, step: int) -> float:
        loss = self.result.valid_losses[step] = self.evaluate()
        self.log.line(f"step {step:>6} | validation loss {loss:.4f}")
        self.log.scalars(step, **{"loss/validation": loss})
        return loss

    # ---- checkpoints (the Checkpointer owns intervals, keep-last, async saves and resume)
    def _save(self, step: int, consumed_samples: int) -> None:
        path = self.checkpointer.save(step, consumed_samples, self.chunks, self.optimizer,
                                      self.scheduler)
        if self.cfg.checkpoint.async_save:
            self.log.line(f"step {step:>6} | saving {path} in the background")
        else:
            self.result.saved.append(path)
            self.log.line(f"step {step:>6} | saved {path}")

    def _collect_saves(self, blocking: bool) -> None:
        """Complete the asynchronous saves whose writers are done (all of them if blocking)."""
        if self.checkpointer is None:
            return
        for path in self.checkpointer.wait() if blocking else self.checkpointer.poll():
            self.result.saved.append(path)
            self.log.line(f"checkpoint {path} complete")

    def _save_at_end(self) -> None:
        """The final state, at the last step or when stopped early, unless just saved."""
        stopped, finished = self.result.stop_reason, self.step == self.cfg.training.train_iters
        if self.checkpointer is not None and self.checkpointer.last_saved != self.step and (
                stopped or finished):
            self._save(self.step, self.consumed)
        if stopped:
            self.log.line(f"step {self.step:>6} | stopping ({stopped})")
        self._collect_saves(blocking=True)

    def _resume(self):
        """The checkpointer (None without ``checkpoint.save``) and the checkpoint resumed from."""
        c, rank0 = self.cfg.checkpoint, self.info.rank == 0
        if not c.save:
            return None, None
        checkpointer = ckpt.Checkpointer(
            c.save, self.groups, self.layout, self.cfg.to_dict(), self.seq_length,
            keep_last=c.keep_last, async_save=c.async_save, checksums=c.verify_checksums,
            save_interval=c.save_interval,
            log=(lambda text: print(text, flush=True)) if rank0 else (lambda text: None))
        checkpointer.remove_incomplete()
        if not c.resume:
            return checkpointer, None
        resumed = checkpointer.load(self.chunks, self.optimizer, self.scheduler)
        if resumed is not None:
            self.step, self.consumed = resumed.step, resumed.consumed_samples
        if rank0:
            if resumed is None:
                print(f"no checkpoint in {c.save}: starting from scratch", flush=True)
            elif resumed.model_only:
                # e.g. imported from Hugging Face (tools/hf/convert.py import): continued
                # pretraining from these weights with a fresh optimizer, schedule and data order
                print(f"starting from the weights of the model-only checkpoint {resumed.path} "
                      "(fresh optimizer, step 0)", flush=True)
            else:
                print(f"resuming from step {self.step} ({resumed.path})", flush=True)
            for note in (resumed.notes if resumed else []):
                print(note, flush=True)
        return checkpointer, resumed

    # ---- building
    def _build_model(self) -> None:
        cfg, t, p = self.cfg, self.cfg.training, self.cfg.parallel
        tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
        self.tokenizer = tokenizer
        self.vocab_size = pad_vocab_size(tokenizer.vocab_size, t.make_vocab_size_divisible_by,
                                         p.tensor_model_parallel_size)
        self.stages = pipeline_stages(cfg, self.model_config)
        pp_rank, pp_size = self.groups.pp.rank(), p.pipeline_model_parallel_size
        self.chunks = [
            TransMambaLanguageModel(self.model_config, self.vocab_size, pg_collection=self.groups,
                                    layer_range=self.stages[stage], pre_process=stage == 0,
                                    post_process=stage == len(self.stages) - 1,
                                    init_seed=t.seed, recompute=t.recompute == "full",
                                    vp_stage=(chunk if p.virtual_pipeline_model_parallel_size
                                              else None)).to(self.device)
            for chunk, stage in enumerate(
                rank_stages(pp_rank, pp_size, p.virtual_pipeline_model_parallel_size))]
        num_params = torch.tensor(float(sum(count_parameters(c, p.tensor_model_parallel_size)
                                            for c in self.chunks)),
                                  dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(num_params, group=self.groups.pp)
        self.num_params = int(num_params.item())
        self.startup["model"] = time.time() - self.start_time
        self.frozen = [name for c in self.chunks
                       for name in freeze_unused_parameters(
                           c, self.vocab_size, self.seq_length // p.context_parallel_size,
                           self.device)] if p.overlap_grad_reduce else []
        if t.compile and not t.cuda_graphs:    # with CUDA graphs, the captured layers compile
            compile_layers(self.chunks, t.compile_fullgraph)
        with capturable_streams(t.cuda_graphs):
            self.ddp_models = wrap_model_chunks(self.chunks, self.model_config, self.bf16,
                                                p.use_distributed_optimizer,
                                                p.overlap_grad_reduce)
        self.startup["probe"] = time.time() - self.start_time      # includes Triton compilation

    def _build_data(self) -> None:
        cfg, t, p = self.cfg, self.cfg.training, self.cfg.parallel
        self.train_ds, self.valid_ds, _ = build_pretraining_datasets(
            cfg.data, self.tokenizer, self.seq_length,
            (t.train_iters * self.global_batch, t.eval_iters * t.micro_batch_size * self.dp_size,
             0), t.seed)
        self.startup["data"] = time.time() - self.start_time
        self.train_iter = self._iterators(self.train_ds, self.consumed, cfg.data.num_workers)
        schedule = {"pg_collection": self.groups}
        if p.pipeline_model_parallel_size > 1:
            from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
            schedule["p2p_communicator"] = P2PCommunicator(self.groups.pp, self.model_config)
        self.forward_backward = partial(get_forward_backward_func(), **schedule)
        self.forward_step = partial(lm_forward_step, device=self.device, cp_group=self.groups.cp)

    def _iterators(self, dataset, consumed_samples: int, num_workers: int):
        """One iterator per model chunk (the interleaved schedule reads each chunk's own); every
        stage reads the same batches (the first uses the tokens, the last the labels)."""
        its = [iter(build_data_loader(dataset, consumed_samples, self.cfg.training.micro_batch_size,
                                      self.dp_rank, self.dp_size, num_workers))
               for _ in self.chunks]
        return its if len(its) > 1 else its[0]

    def _new_result(self) -> TrainResult:
        t = self.cfg.training
        return TrainResult(
            num_parameters=self.num_params, tokens_per_step=self.global_batch * self.seq_length,
            resumed_from=self.resumed.path if self.resumed is not None else None,
            layout={**self.layout, "num_microbatches": self.num_micro,
                    "optimizer": [type(o).__name__ for o in
                                  getattr(self.optimizer, "chained_optimizers", [self.optimizer])],
                    "overlap_grad_reduce": self.ddp_models[0].ddp_config.overlap_grad_reduce,
                    "compile": t.compile, "cuda_graphs": t.cuda_graphs,
                    "recompute": (f"selective ({', '.join(t.recompute_modules)})"
                                  if t.recompute == "selective" else t.recompute),
                    "stage_layers": [[r.start, r.stop] for r in self.stages],
                    "rank_layers": [list(c.layer_range) for c in self.chunks],
                    "layer_numbers": [[layer.layer_number for layer in c.layers]
                                      for c in self.chunks]})

    def _announce(self) -> None:
        if self.info.rank != 0:
            return
        self.log.line(startup_line(self.cfg, self.model_config, self.info, self.num_params,
                                   self.chunks, self.bf16, self.global_batch, self.num_micro))
        if self.frozen:
            self.log.line(f"frozen (no gradient at T={self.seq_length}, see "
                          f"freeze_unused_parameters): {', '.join(self.frozen)}")
        self.log.line("start-up seconds (cumulative): " + ", ".join(
            f"{name} {seconds:.1f}" for name, seconds in self.startup.items()))

    def _finish(self) -> TrainResult:
        result = self.result
        result.flops_per_token, result.peak_tflops = self.flops_per_token, self.peak_tflops
        result.profile = self.profiler.stats
        if self.device.type == "cuda":
            peak_memory = torch.tensor(torch.cuda.max_memory_allocated(self.device),
                                       device=self.device)
            torch.distributed.all_reduce(peak_memory, op=torch.distributed.ReduceOp.MAX)
            result.peak_memory_bytes = int(peak_memory.item())
            self.log.line(f"peak memory per GPU (max over ranks): "
                          f"{format_bytes(result.peak_memory_bytes)}")
        self.log.close()
        result.seconds = time.time() - self.start_time
        return result
