"""Profiling a window of training steps with the PyTorch profiler (Megatron-LM's ``--profile``).

``logging.profile: true`` records steps ``profile_step_start`` .. ``profile_step_end`` (1-based,
inclusive) on the ranks of ``profile_ranks``. Each profiled rank writes a Chrome trace
(``<profile_dir>/rank<r>.json``, open it in Perfetto or chrome://tracing) and prints:
- the operators with the most device time (CPU time on CPU runs);
- how busy the device was: the kernels' summed time against the window's wall time.
A low busy fraction means the GPU waits for the host (launch overhead, synchronisations),
not for its kernels.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

import torch


def step_stats(events, wall: float, steps: int, on_gpu: bool) -> dict:
    """Per-step numbers of a profiled window (milliseconds): ``wall_ms``; ``host_ms``, the self
    CPU time of every host-side operator and runtime call summed over threads (what the host
    spends issuing the step); on GPU ``device_ms``, the summed time of the device-side events
    (kernels, copies), ``launches``, how many there were, and ``host_launch_calls``, the
    runtime's kernel and graph launches (a replayed CUDA graph is one call for its kernels).
    Device entries are None on CPU."""
    device = torch.autograd.DeviceType.CUDA
    host = [e for e in events if e.device_type != device]
    stats = {"wall_ms": wall * 1e3 / steps,
             "host_ms": sum(e.self_cpu_time_total for e in host) / 1e3 / steps,
             "device_ms": None, "launches": None, "host_launch_calls": None}
    if on_gpu:
        kernels = [e for e in events if e.device_type == device]
        stats.update(
            device_ms=sum(e.self_device_time_total for e in kernels) / 1e3 / steps,
            launches=sum(e.count for e in kernels) / steps,
            host_launch_calls=sum(e.count for e in host if "LaunchKernel" in e.key
                                  or "GraphLaunch" in e.key) / steps)
    return stats


class StepProfiler:
    """``begin(step)`` before and ``end(step)`` after each training step (1-based step numbers
    of the step about to run / just run); does nothing outside the window or on other ranks."""

    def __init__(self, logging_config, rank: int, log: Callable[[str], None],
                 default_dir: str = "runs/profile"):
        cfg = logging_config
        self.enabled = bool(cfg.profile) and rank in cfg.profile_ranks
        self.first_step, self.last_step = cfg.profile_step_start, cfg.profile_step_end
        self.directory = cfg.profile_dir or default_dir
        self.rank, self.log = rank, log
        self.profiler: Optional[torch.profiler.profile] = None
        self.wall_start = 0.0
        self.stats: Optional[dict] = None       # per-step numbers of the window (``step_stats``)

    def begin(self, step: int) -> None:
        if not self.enabled or step != self.first_step:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=False)
        self.profiler.__enter__()
        self.wall_start = time.perf_counter()

    def end(self, step: int) -> None:
        if self.profiler is None or step != self.last_step:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.wall_start
        self.profiler.__exit__(None, None, None)
        profiler, self.profiler = self.profiler, None
        os.makedirs(self.directory, exist_ok=True)
        trace = os.path.join(self.directory, f"rank{self.rank}.json")
        profiler.export_chrome_trace(trace)
        self.stats = step_stats(profiler.key_averages(), wall, self.last_step - self.first_step + 1,
                                torch.cuda.is_available())
        self.log(self.summary(profiler, wall, trace))

    def summary(self, profiler, wall: float, trace: str) -> str:
        on_gpu = torch.cuda.is_available()
        events = profiler.key_averages()
        steps = self.last_step - self.first_step + 1
        lines = [f"profile of steps {self.first_step}-{self.last_step} on rank {self.rank} "
                 f"({wall * 1e3 / steps:.1f} ms a step), trace {trace}"]
        if on_gpu:
            # the device-side events only (kernels, copies): an operator's self device time is
            # that of the kernels it launched, which are listed themselves as well
            kernels = sum(e.self_device_time_total for e in events
                          if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6   # us -> s
            lines.append(f"device busy {kernels * 1e3 / steps:.1f} ms a step of "
                         f"{wall * 1e3 / steps:.1f} ms wall ({100 * kernels / wall:.0f}%); "
                         f"the rest the device waits for the host")
        sort = "self_device_time_total" if on_gpu else "self_cpu_time_total"
        lines.append(events.table(sort_by=sort, row_limit=25, max_name_column_width=60))
        return "\n".join(lines)
