"""The optimizer step without waiting for the device: norm, clip and NaN/inf skip stay on it.

megatron-core's ``optimizer.step()`` reads the global gradient norm to the host
(``get_grad_norm_fp32`` ends in ``.item()``) to decide whether to clip and whether the step is
finite, so every step waits for the device to finish its backward: at micro-batch 1 the GPU then
idles while the host queues the next forward. Here the same parts run in the same order
(prepare the main gradients, global norm, clip every part by it, update), with the norm, the
clip coefficient and the finite check as device tensors:

- the norm is megatron-core's (per-tensor L2 norms of the gradients it selects, the squared
  total all-reduced over its group) and the clip coefficient ``max_norm / (norm + 1e-6)`` is
  computed in float64 as megatron-core does on the host, then applied as a float32 scale: the
  same bits as ``optimizer.step()`` (tests/training/test_optimizer_step.py);
- a non-finite loss or norm sets ``found_inf`` of torch's fused AdamW, which then leaves the
  weights, the moments and the step counters untouched (megatron-core never calls it then);
- ``StepRecords`` brings each step's loss, norm and flags to the host one step late, through
  pinned memory and a CUDA event, so the training loop learns of a skipped step before the
  next update (the LR schedule and the NaN policy act on it exactly as before) while the device
  already runs the next step's forward and backward.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional

import torch
from torch import Tensor

from megatron_transmamba.training.multi_tensor import foreach_l2_norm


def _parts(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _squared_norm(grads: list, group, device: torch.device) -> Tensor:
    """megatron-core's ``get_grad_norm_fp32`` before its host read: [1] float32 sum of squares
    over ``group``."""
    if grads:
        total = foreach_l2_norm(None, None, [grads], False)[0] ** 2
    else:
        total = torch.zeros(1, dtype=torch.float32, device=device)
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=group)
    return total


@torch.no_grad()
def squared_gradient_norms(optimizer, device: torch.device) -> tuple[Tensor, bool]:
    """What megatron-core's ``get_grad_norm`` reduces, before its host read: ([n] float32
    all-reduced sums of squares, whether they are n separately reduced parts whose norms
    combine as the root of their summed squares) — ``naive.step_scalars_naive``'s input."""
    parts = _parts(optimizer)
    if len(parts) == 1 or optimizer.grads_states_parallel_group_is_shared():
        grads = [g for part in parts for g in part.get_main_grads_for_grad_norm()]
        group = (parts[0] if len(parts) == 1 else optimizer).get_grad_stats_parallel_group()
        return _squared_norm(grads, group, device), False
    return torch.cat([_squared_norm(part.get_main_grads_for_grad_norm(),
                                    part.get_grad_stats_parallel_group(), device)
                      for part in parts]), True


def clip_norm(optimizer) -> float:
    """The parts' common ``clip_grad`` (0: no clipping)."""
    values = {part.config.clip_grad for part in _parts(optimizer)
              if not getattr(part, "is_stub_optimizer", False)}
    if len(values) > 1:
        raise ValueError(f"the optimizer's parts clip at different norms {sorted(values)}")
    return max(values.pop(), 0.0) if values else 0.0


def step_scalars(squared: Tensor, loss: Tensor, stop_flag: Tensor, max_norm: float,
                 separate_parts: bool, use_triton: Optional[bool] = None):
    """(record [loss, norm, stop] float64, clip scale float32, found_inf float32): one Triton
    launch on GPUs (``use_triton=None``), the PyTorch reference elsewhere."""
    if use_triton is None:
        use_triton = squared.device.type == "cuda"
    if use_triton:
        from transmamba_kernels.optimizer.step_scalars import step_scalars_triton as scalars
    else:
        from transmamba_kernels.optimizer.naive import step_scalars_naive as scalars
    return scalars(squared, loss, stop_flag, max_norm, separate_parts)


@torch.no_grad()
def clip_gradients(optimizer, scale: Tensor) -> None:
    """``clip_grad_by_total_norm_fp32`` of every part, on the device: gradients times the
    float32 ``scale`` (a scale of 1 leaves them unchanged)."""
    for part in _parts(optimizer):
        if getattr(part, "is_stub_optimizer", False) or part.config.clip_grad <= 0.0:
            continue
        if part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            raise ValueError("clip_gradients: the precision-aware optimizer keeps decoupled "
                             "gradients, which this step does not clip")
        grads = [p.grad.detach() for p in part.get_parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale)


def _inner_optimizers(optimizer) -> list:
    return [part.optimizer for part in _parts(optimizer)
            if not getattr(part, "is_stub_optimizer", False) and getattr(part, "optimizer", None)]


def skips_on_device(optimizer) -> bool:
    """Whether every inner optimizer is torch's fused Adam(W), which takes ``found_inf``."""
    inner = _inner_optimizers(optimizer)
    return all(isinstance(o, (torch.optim.Adam, torch.optim.AdamW))
               and all(group.get("fused") for group in o.param_groups) for o in inner)


def apply_update(optimizer, scale: Tensor, found_inf: Tensor) -> None:
    """Clip by ``scale`` and update, unless ``found_inf`` (0-d float32 device tensor) is 1: then
    nothing changes (weights, Adam moments, step counters). Needs ``skips_on_device``."""
    clip_gradients(optimizer, scale)
    inner = _inner_optimizers(optimizer)
    for o in inner:
        o.found_inf = found_inf
    try:
        optimizer.step_with_ready_grads()
    finally:
        for o in inner:
            del o.found_inf


def device_step(optimizer, loss: Tensor, stop_flag: Tensor, device: torch.device,
                use_triton: Optional[bool] = None) -> Tensor:
    """The training loop's optimizer step with nothing read on the host: prepare the main
    gradients, norm, clip, update (skipped on the device when the loss or the norm is not
    finite). Returns the step's record [loss, gradient norm, stop_flag] (float64, on the
    device) for ``StepRecords``."""
    if optimizer.prepare_grads():            # a loss scaler found inf/NaN (fp16): no norm
        squared, separate = torch.full((1,), float("nan"), device=device), False
    else:
        squared, separate = squared_gradient_norms(optimizer, device)
    record, scale, found_inf = step_scalars(squared, loss, stop_flag, clip_norm(optimizer),
                                            separate, use_triton)
    apply_update(optimizer, scale, found_inf)
    return record


def optimizer_step(optimizer) -> tuple[bool, float]:
    """One step, waiting for its outcome: (applied, gradient norm). For tests and tools; the
    training loop uses ``device_step`` and reads its record one step late."""
    device = _device_of(optimizer)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    _, norm, _ = device_step(optimizer, zero, zero, device).tolist()
    return math.isfinite(norm), norm


def _device_of(optimizer) -> torch.device:
    for part in _parts(optimizer):
        for param in part.get_parameters():
            return param.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


class StepRecords:
    """Per-step scalars (a 1-d float64 device tensor each) read on the host later, in order.

    ``push`` starts a copy into pinned host memory and records a CUDA event after it;
    ``pop`` waits for the oldest one's event, so reading the previous step's record while the
    current step is queued does not leave the device idle. On the CPU the values are ready."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pending: deque = deque()

    def __len__(self) -> int:
        return len(self._pending)

    def push(self, step: int, values: Tensor) -> None:
        event = None
        if values.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = values.detach().clone()
        self._pending.append((step, host, event))

    def pop(self) -> Optional[tuple[int, list]]:
        if not self._pending:
            return None
        step, host, event = self._pending.popleft()
        if event is not None:
            event.synchronize()
        return step, host.tolist()
