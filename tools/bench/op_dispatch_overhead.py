"""Host time of our ops' eager calls: the registered custom op against the direct path.

    python tools/bench/op_dispatch_overhead.py [--iters 2000] [--repeats 5] [--model]

Every Triton launch is stubbed out (the interpreter's ``run`` returns at once), so what is
timed is the host's work per call: the public wrapper's checks, allocations, autograd, and the
dispatcher and torch's generated ``autograd.Function`` when the custom op is taken
(``transmamba_kernels.custom_op``; ``custom_op_path()`` forces it). For each op at a tiny CPU
shape: microseconds per forward + backward (the best of ``--repeats`` runs of ``--iters``
calls, the paths alternated) and the number of Python calls cProfile counts in one forward +
backward (exact, the same on every machine). ``--model``: one forward + backward of a
24-layer TransMamba model (``transmamba_400m.yaml``'s layer pattern and V9 TransPoints at
hidden 64, T = 64, triton backend), median of 20 steps, the two paths alternated
``--repeats`` times.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"    # one autotuning config; its launches are stubbed below

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from megatron_transmamba.layers.mixer_core import fused_core  # noqa: E402
from megatron_transmamba.layers.rotary import rope_table  # noqa: E402
from transmamba_kernels.conv.causal_conv import causal_conv1d_silu_triton  # noqa: E402
from transmamba_kernels.cross_entropy.cross_entropy import cross_entropy_triton  # noqa: E402
from transmamba_kernels.custom_op import custom_op_path  # noqa: E402
from transmamba_kernels.norm.gated_rmsnorm import gated_rmsnorm_triton  # noqa: E402
from transmamba_kernels.norm.rmsnorm import add_rmsnorm_triton, rmsnorm_triton  # noqa: E402
from transmamba_kernels.rope.rope_qk import rope_qk_triton  # noqa: E402
from transmamba_kernels.ssd.chunk import transmamba_ssd_triton  # noqa: E402
from transmamba_kernels.swiglu.swiglu import swiglu_triton  # noqa: E402

PATHS = ("custom_op", "direct")


def _leaf(*shape):
    return torch.randn(*shape).requires_grad_(True)


def cases() -> dict:
    """name -> (fn, inputs): each public op at a tiny shape, differentiable inputs as leaves."""
    x16 = lambda: (_leaf(1, 64, 2, 16), _leaf(1, 64, 2), _leaf(2), _leaf(2), _leaf(1, 64, 2, 16),
                   _leaf(1, 64, 2, 16), _leaf(2))
    table, target = rope_table(64, 16, 10000.0), torch.zeros(64, dtype=torch.long)
    return {
        "rmsnorm": (lambda x, w: rmsnorm_triton(x, w, 1e-5), (_leaf(64, 64), _leaf(64))),
        "add_rmsnorm": (lambda x, r, w: add_rmsnorm_triton(x, r, w, 1e-5),
                        (_leaf(64, 64), _leaf(64, 64), _leaf(64))),
        "gated_rmsnorm": (lambda y, z, w: gated_rmsnorm_triton(y, z, w, 2, 1e-5, 16),
                          (_leaf(1, 64, 64), _leaf(1, 64, 64), _leaf(64))),
        "causal_conv1d_silu": (causal_conv1d_silu_triton, (_leaf(1, 64, 96), _leaf(96, 1, 4),
                                                           _leaf(96))),
        "swiglu": (swiglu_triton, (_leaf(64, 256),)),
        "rope_qk": (lambda q, k: rope_qk_triton(q, k, table),
                    (_leaf(1, 64, 2, 16), _leaf(1, 64, 2, 16))),
        "cross_entropy": (lambda logits: cross_entropy_triton(logits, target), (_leaf(64, 512),)),
        "ssd": (lambda *a: transmamba_ssd_triton(*a, 16, 0), x16()),
        "mixer_core": (lambda *a: fused_core(*a, 16, 16, 0.25, table), x16()),
    }


def _forward_backward(fn, inputs):
    out = fn(*inputs)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]
    torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs])


def _path(name: str):
    return custom_op_path() if name == "custom_op" else contextlib.nullcontext()


def time_op(fn, inputs, iters: int, repeats: int) -> dict:
    """path -> (µs per forward + backward, best of the repeats with the paths alternated
    (other load on the machine only adds time), cProfile's count of Python calls in one)."""
    runs = {path: [] for path in PATHS}
    calls = {}
    for path in PATHS:
        with _path(path):
            for _ in range(10):
                _forward_backward(fn, inputs)
            profile = cProfile.Profile()
            profile.enable()
            _forward_backward(fn, inputs)
            profile.disable()
        calls[path] = pstats.Stats(profile).total_calls
    for _ in range(repeats):
        for path in PATHS:
            with _path(path):
                start = time.perf_counter()
                for _ in range(iters):
                    _forward_backward(fn, inputs)
                runs[path].append((time.perf_counter() - start) / iters * 1e6)
    return {path: (min(runs[path]), calls[path]) for path in PATHS}


def time_model(steps: int, repeats: int) -> dict:
    """Median ms of one model forward + backward per path, the paths alternated."""
    from megatron_transmamba.config import TransMambaConfig
    from megatron_transmamba.models.language_model import TransMambaLanguageModel
    from megatron_transmamba.parallel.initialize import destroy_distributed, initialize_distributed

    initialize_distributed(seed=1234)
    try:
        cfg = TransMambaConfig(hidden_size=64, ffn_hidden_size=128, num_attention_heads=2,
                               num_query_groups=2, kv_channels=32,
                               layer_pattern="T-" * 12, seq_length=64, transpoint_schedule="v9",
                               mamba_num_heads=2, mamba_num_groups=2, mamba_head_dim=16,
                               mamba_state_dim=16, ssd_chunk_size=16, mixer_backend="triton",
                               use_cpu_initialization=True)
        model = TransMambaLanguageModel(cfg, vocab_size=256)
        tokens = torch.randint(0, 256, (1, 65))

        def step():
            model(tokens[:, :-1], labels=tokens[:, 1:]).sum().backward()

        times = {path: [] for path in PATHS}
        for _ in range(repeats):
            for path in PATHS:
                with _path(path):
                    for _ in range(3):
                        step()
                    for _ in range(steps):
                        start = time.perf_counter()
                        step()
                        times[path].append((time.perf_counter() - start) * 1e3)
        calls = {}
        for path in PATHS:
            with _path(path):
                profile = cProfile.Profile()
                profile.enable()
                step()
                profile.disable()
            calls[path] = pstats.Stats(profile).total_calls
        return {path: (statistics.median(times[path]), calls[path]) for path in PATHS}
    finally:
        destroy_distributed()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", action="store_true", help="also time a model step")
    args = parser.parse_args(argv)
    InterpretedFunction.run = lambda self, *a, **k: None
    torch.set_num_threads(1)
    print(f"{'op (forward + backward)':<22}{'custom op µs':>14}{'direct µs':>11}{'saved':>8}"
          f"{'calls custom op':>17}{'calls direct':>14}")
    for name, (fn, inputs) in cases().items():
        r = time_op(fn, inputs, args.iters, args.repeats)
        (t_op, calls_op), (t_direct, calls_direct) = r["custom_op"], r["direct"]
        print(f"{name:<22}{t_op:>14.1f}{t_direct:>11.1f}{1 - t_direct / t_op:>8.0%}"
              f"{calls_op:>17}{calls_direct:>14}")
    if args.model:
        r = time_model(20, args.repeats)
        (t_op, calls_op), (t_direct, calls_direct) = r["custom_op"], r["direct"]
        print(f"{'model step (ms)':<22}{t_op:>14.2f}{t_direct:>11.2f}{1 - t_direct / t_op:>8.0%}"
              f"{calls_op:>17}{calls_direct:>14}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
