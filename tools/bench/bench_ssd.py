"""SSD / mixer-core benchmark and bf16 check on one GPU: prints markdown tables.

    python tools/bench/bench_ssd.py                  # the layouts of NOTES, 65,536 tokens a call
    python tools/bench/bench_ssd.py --core-only --lengths 8192 --layouts 16,16,128,128
    python tools/bench/bench_ssd.py --smoke          # tiny shapes (CPU with TRITON_INTERPRET=1)
    python tools/bench/bench_ssd.py --kernels        # each SSD kernel alone, every design

``--kernels`` times each launch of one forward and one backward alone (the mixer's call: raw dt,
A_log, D, bf16, p = 0) at the training shape (B=1, T=8192, H=G=16, P=N=96) and at 65,536
tokens (B=8, T=8192, H=G=16, P=N=128), under each design of ``chunk.DESIGN`` (state passing
serial / tiled, chunk backward fused / split) in the same process: one JSON line per kernel
with its median ms by triton.testing.do_bench and by do_bench_cudagraph (no host launch
overhead), and the autotuner's chosen config.

Tables: (1) bf16 error of the Triton SSD against the float32 reference, next to PyTorch's own
bf16 error (the same chunked algorithm computed in bf16), forward and backward; (2) the gated
norm, PyTorch vs Triton; (3) the mixer core at p = 0, T/4, T/2, T, next to the previous
splice (``torch.cat`` of the attention rows and the SSD's rows [p, T)), the SSD with that
TransPoint alone and SDPA on the prefix alone, so "core - SSD - SDPA" is what the splice
costs; (4) times (median of triton.testing.do_bench, ms; backward through torch.autograd.grad,
so no gradient accumulation into leaves is timed) of our SSD forward and forward+backward, our
mixer core (SDPA on [0, p) + the Triton SSD) at p = 0, T/4, T/2, T, SDPA causal attention on
the same shapes, and fla's chunk_simple_gla forward when fla-core is importable.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from contextlib import contextmanager

import torch

from megatron_transmamba.layers.mixer_core import (grouped_attention, prefix_attention,
                                                   transmamba_core_triton)
from transmamba_kernels.ssd import chunk as chunk_module
from transmamba_kernels.reference import ssd as reference_ssd
from transmamba_kernels.ssd import naive
from transmamba_kernels.ssd.chunk import chunk_ssd_triton


def make(batch, T, H, G, P, N, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device)
    return dict(x=r(batch, T, H, P).to(dtype), dt=torch.nn.functional.softplus(r(batch, T, H) - 3),
                A=-torch.exp(torch.rand(H, generator=g) * math.log(16)).to(device),
                B=r(batch, T, G, N, scale=N ** -0.5).to(dtype), C=r(batch, T, G, N, scale=N ** -0.5).to(dtype),
                D=torch.ones(H, device=device))


@contextmanager
def naive_in(dtype):
    """Run the PyTorch reference's arithmetic in ``dtype`` (PyTorch's own low-precision error)."""
    real = reference_ssd.scan_dtype
    reference_ssd.scan_dtype = lambda *tensors: dtype
    try:
        yield
    finally:
        reference_ssd.scan_dtype = real


def rel(ref, out):
    ref, out = ref.double(), out.double()
    return ((ref - out).norm() / ref.norm().clamp_min(1e-30)).item()


def ssd_outputs(fn, inputs, chunk, dtype, **extra):
    leaves = {k: v.detach().clone().to(dtype if k in ("x", "B", "C") else torch.float32).requires_grad_(True)
              for k, v in inputs.items()}
    y = fn(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], chunk, D=leaves["D"], **extra)
    gen = torch.Generator(device="cpu").manual_seed(1)
    dy = torch.randn(y.shape, generator=gen).to(y.device)
    (y.float() * dy).sum().backward()
    return [y] + [leaves[k].grad for k in ("x", "dt", "A", "B", "C")]


def accuracy_table(batch, T, H, G, P, N, chunk, device):
    inputs = make(batch, T, H, G, P, N, torch.bfloat16, device)
    ref = ssd_outputs(naive.chunk_ssd_naive, inputs, chunk, torch.float32)
    with naive_in(torch.bfloat16):
        torch_bf16 = ssd_outputs(naive.chunk_ssd_naive, inputs, chunk, torch.bfloat16)
    ours = ssd_outputs(chunk_ssd_triton, inputs, chunk, torch.bfloat16)
    print(f"\nbf16 accuracy, B={batch} T={T} H={H} G={G} P={P} N={N} chunk={chunk} "
          "(relative L2 error against the float32 reference)\n")
    print("| tensor | PyTorch bf16 | Triton bf16 | ratio |")
    print("|---|---|---|---|")
    worst = 0.0
    for name, r, t, o in zip(["y", "dx", "ddt", "dA", "dB", "dC"], ref, torch_bf16, ours):
        e_t, e_o = rel(r, t), rel(r, o)
        worst = max(worst, e_o / max(e_t, 1e-12))
        print(f"| {name} | {e_t:.2e} | {e_o:.2e} | {e_o / max(e_t, 1e-12):.2f} |")
    return worst


def bench(fn, warmup=5, rep=20):
    if not torch.cuda.is_available():   # --smoke on CPU: one call, only to exercise the code
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def core_with_cat(x, dt, A, B, C, D, p, chunk, softmax_scale):
    """The mixer core as a plain splice: prefix slices and a concatenation (the baseline the
    custom op ``transmamba::core`` avoids)."""
    y = chunk_ssd_triton(x, dt, A, B, C, chunk, D=D, transpoint=p) if p < x.shape[1] else None
    if p == 0:
        return y
    attention = prefix_attention(x, B, C, p, softmax_scale, None)
    return attention if y is None else torch.cat([attention, y[:, p:]], dim=1)


def core_table(layouts, lengths, tokens, chunk, device):
    """Mixer core forward+backward against its parts: where the splice's time goes."""
    print(f"\nMixer core, bf16, chunk {chunk}, ms (median); leaves x, dt, B, C; tokens per call = "
          "B x T\n")
    print("| H,G,P,N | T | B | p | core fwd | core fwd+bwd | cat splice fwd+bwd | SSD(p) fwd+bwd "
          "| SDPA [0, p) fwd+bwd | core - SSD - SDPA |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for H, G, P, N in layouts:
        for T in lengths:
            batch = max(1, tokens // T)
            inputs = make(batch, T, H, G, P, N, torch.bfloat16, device)
            A, D = inputs["A"], inputs["D"]
            leaves = [inputs[k].detach().clone().requires_grad_(True) for k in ("x", "dt", "B", "C")]
            x, dt, B, C = leaves
            dy = torch.randn_like(x)
            for p in (0, T // 4, T // 2, T):
                def fwd_bwd(fn, p=p):
                    torch.autograd.grad(fn(x, dt, A, B, C, D, p, chunk, N ** -0.5), leaves, dy,
                                        allow_unused=True)
                core_f = bench(lambda: transmamba_core_triton(x, dt, A, B, C, D, p, chunk, N ** -0.5))
                core_fb = bench(lambda: fwd_bwd(transmamba_core_triton))
                cat_fb = bench(lambda: fwd_bwd(core_with_cat))
                ssd_fb = 0.0
                if p < T:
                    ssd_fb = bench(lambda: torch.autograd.grad(
                        chunk_ssd_triton(x, dt, A, B, C, chunk, D=D, transpoint=p), leaves, dy))
                sdpa_fb = 0.0
                if p > 0:
                    q, k, v = (t[:, :p].detach().clone().requires_grad_(True) for t in (C, B, x))
                    sdpa_fb = bench(lambda: torch.autograd.grad(
                        grouped_attention(q, k, v, N ** -0.5), (q, k, v), dy[:, :p]))
                print(f"| {H},{G},{P},{N} | {T} | {batch} | {p} | {core_f:.3f} | {core_fb:.3f} | "
                      f"{cat_fb:.3f} | {ssd_fb:.3f} | {sdpa_fb:.3f} | "
                      f"{core_fb - ssd_fb - sdpa_fb:.3f} |", flush=True)


def timing_table(layouts, lengths, tokens, chunks, device, fla):
    print("\nTimes in ms (median, bf16), tokens per call = B x T\n")
    head = "| H,G,P,N | T | B | chunk | SSD fwd | SSD fwd+bwd | core p=0 | core p=T/4 | core p=T/2 | core p=T | SDPA fwd | SDPA fwd+bwd |"
    if fla:
        head += " fla simple_gla fwd |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for H, G, P, N in layouts:
        for T in lengths:
            batch = max(1, tokens // T)
            inputs = make(batch, T, H, G, P, N, torch.bfloat16, device)
            x, dt, A, B, C, D = (inputs[k] for k in ("x", "dt", "A", "B", "C", "D"))
            leaves = [t.detach().clone().requires_grad_(True) for t in (x, dt, B, C)]
            best = None
            for chunk in chunks:
                fwd = bench(lambda: chunk_ssd_triton(x, dt, A, B, C, chunk, D=D))
                y = chunk_ssd_triton(leaves[0], leaves[1], A, leaves[2], leaves[3], chunk, D=D)
                dy = torch.randn_like(y)

                def fwd_bwd():
                    out = chunk_ssd_triton(leaves[0], leaves[1], A, leaves[2], leaves[3], chunk, D=D)
                    torch.autograd.grad(out, leaves, dy)
                both = bench(fwd_bwd)
                if best is None or both < best[2]:
                    best = (chunk, fwd, both)
            chunk, fwd, both = best
            cores = []
            for p in (0, T // 4, T // 2, T):
                def core_fb(p=p):
                    out = transmamba_core_triton(leaves[0], leaves[1], A, leaves[2], leaves[3], D, p,
                                                 chunk, N ** -0.5)
                    torch.autograd.grad(out, leaves, dy, allow_unused=True)
                cores.append(bench(core_fb))
            q, k = [t.detach().clone().requires_grad_(True) for t in (C, B)]
            v = x.detach().clone().requires_grad_(True)
            sdpa_f = bench(lambda: grouped_attention(q, k, v, N ** -0.5))
            attn_dy = torch.randn_like(x)
            sdpa_fb = bench(lambda: torch.autograd.grad(grouped_attention(q, k, v, N ** -0.5),
                                                        (q, k, v), attn_dy))
            row = (f"| {H},{G},{P},{N} | {T} | {batch} | {chunk} | {fwd:.3f} | {both:.3f} | "
                   + " | ".join(f"{c:.3f}" for c in cores) + f" | {sdpa_f:.3f} | {sdpa_fb:.3f} |")
            if fla:
                from fla.ops.simple_gla import chunk_simple_gla
                qf = C.repeat_interleave(H // G, 2)
                kf = B.repeat_interleave(H // G, 2)
                vf = (x.float() * dt[..., None]).to(x.dtype)
                gf = (dt * A).float()
                row += f" {bench(lambda: chunk_simple_gla(qf, kf, vf, gf, scale=1.0)):.3f} |"
            print(row, flush=True)


def norm_table(tokens, device):
    """Gated grouped RMSNorm: PyTorch reference vs the fused Triton kernel (bf16)."""
    from transmamba_kernels.norm.gated_rmsnorm import gated_rmsnorm_triton
    from transmamba_kernels.norm.naive import gated_rmsnorm_naive

    print("\nGated grouped RMSNorm, bf16, ms (median)\n")
    print("| B x T | C | G | p | PyTorch fwd | PyTorch fwd+bwd | Triton fwd | Triton fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|")
    for T, C, G in ((8192, 2048, 16), (8192, 1536, 16)):
        batch = max(1, tokens // T)
        y, z = (torch.randn(batch, T, C, device=device, dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2))
        w = torch.ones(C, device=device, requires_grad=True)
        dout = torch.randn_like(y)
        p = T // 2
        row = f"| {batch} x {T} | {C} | {G} | {p} |"
        for fn in (gated_rmsnorm_naive, gated_rmsnorm_triton):
            fwd = bench(lambda: fn(y, z, w, G, 1e-5, p))
            both = bench(lambda: torch.autograd.grad(fn(y, z, w, G, 1e-5, p), (y, z, w), dout))
            row += f" {fwd:.3f} | {both:.3f} |"
        print(row, flush=True)


class _Recorded:
    """Stands in for a kernel in ``chunk_module``: records each launch (grid, arguments), then
    launches the real kernel."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, self.kernel, grid, args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


def _record_launches(fn):
    """[(name, kernel, grid, args, kwargs)] of every kernel ``fn()`` launches in chunk_module."""
    log, real = [], {}
    for name in dir(chunk_module):
        if name.endswith("_kernel"):
            real[name] = getattr(chunk_module, name)
            setattr(chunk_module, name, _Recorded(name, real[name], log))
    try:
        fn()
    finally:
        for name, kernel in real.items():
            setattr(chunk_module, name, kernel)
    return log


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time_kernel(launch):
    """(do_bench ms, do_bench_cudagraph ms) of one launch, medians. In-place kernels (the
    state passing) rerun on their own output: the same work on other values."""
    if not torch.cuda.is_available():   # the "smoke" shape on CPU: only exercises the code
        return bench(launch), float("nan")
    import triton.testing
    ms = triton.testing.do_bench(launch, warmup=5, rep=25, return_mode="median")
    try:
        graph = triton.testing.do_bench_cudagraph(launch, rep=25, return_mode="median")
    except Exception:  # noqa: BLE001 - a kernel that cannot be captured still gets do_bench
        graph = float("nan")
    return ms, graph


KERNEL_SHAPES = {"train": (1, 8192, 16, 16, 96, 96), "64k": (8, 8192, 16, 16, 128, 128),
                 "smoke": (1, 100, 2, 2, 16, 16)}
DESIGNS = [dict(passing=a, chunk_bwd=b) for a, b in itertools.product(("serial", "tiled"),
                                                                       ("fused", "split"))]


def kernel_table(shapes, chunk, device):
    """Each SSD kernel alone, for every design, one JSON line per kernel (see the docstring)."""
    saved_design = dict(chunk_module.DESIGN)
    if device == "cuda":
        print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                              triton=__import__("triton").__version__)), flush=True)
    for label in shapes:
        batch, T, H, G, P, N = KERNEL_SHAPES[label]
        inputs = make(batch, T, H, G, P, N, torch.bfloat16, device)
        x, B, C = inputs["x"], inputs["B"], inputs["C"]
        dt = torch.randn(batch, T, H, device=device).to(torch.bfloat16) - 2
        dt_bias = torch.zeros(H, device=device)
        A_log = torch.rand(H, device=device) * math.log(16)
        D = inputs["D"]
        dy = torch.randn_like(x)
        fwd_args = (x, dt, dt_bias, A_log, B, C, D, None, chunk, 0, True, True, 0.0, math.inf,
                    None, None, None, 0)
        for design in DESIGNS:
            chunk_module.DESIGN.update(design)
            start = time.perf_counter()
            y, final, states, decay = chunk_module._ssd_fwd(*fwd_args)     # autotunes
            bwd = lambda: chunk_module._ssd_bwd(
                dy, None, x, dt, dt_bias, A_log, B, C, D, None, states, final, decay,
                chunk, 0, True, True, 0.0, math.inf, None, None, None, None, None, None, 0)
            bwd()
            _sync(device)
            tuning = time.perf_counter() - start
            totals = {}
            for phase, fn in (("fwd", lambda: chunk_module._ssd_fwd(*fwd_args)), ("bwd", bwd)):
                log = _record_launches(fn)
                _sync(device)
                for name, kernel, grid, args, kwargs in log:
                    ms, graph = _time_kernel(lambda: kernel[grid](*args, **kwargs))
                    config = getattr(kernel, "best_config", None)
                    totals[phase] = totals.get(phase, 0.0) + graph
                    print(json.dumps(dict(shape=label, B=batch, T=T, H=H, G=G, P=P, N=N, chunk=chunk,
                                          **design, phase=phase, kernel=name,
                                          ms=round(ms, 4), ms_graph=round(graph, 4),
                                          config=str(config) if config is not None else None)),
                          flush=True)
                whole, whole_graph = _time_kernel(fn)
                print(json.dumps(dict(shape=label, **design, phase=phase, kernel="total",
                                      ms=round(whole, 4), ms_graph=round(whole_graph, 4),
                                      sum_of_kernels_graph=round(totals[phase], 4),
                                      first_call_s=round(tuning, 1))), flush=True)
    chunk_module.DESIGN.update(saved_design)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for a CPU check")
    parser.add_argument("--core-only", action="store_true",
                        help="only the mixer-core table (at the first chunk size)")
    parser.add_argument("--kernels", action="store_true",
                        help="each SSD kernel alone under every design (JSON lines)")
    parser.add_argument("--kernel-shapes", default="train,64k",
                        help=f"shapes of --kernels, from {list(KERNEL_SHAPES)}")
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--lengths", default="2048,8192,32768,131072")
    parser.add_argument("--chunks", default="64,128")
    parser.add_argument("--layouts", default="16,16,128,128;16,16,96,96")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import fla  # noqa: F401
        has_fla = device == "cuda"
    except ImportError:
        has_fla = False
    layouts = [tuple(int(v) for v in s.split(",")) for s in args.layouts.split(";")]
    lengths = [int(v) for v in args.lengths.split(",")]
    chunks = [int(v) for v in args.chunks.split(",")]
    if args.smoke:
        worst = accuracy_table(1, 40, 2, 1, 16, 16, 16, device)
        print(f"\nworst ratio {worst:.2f}")
        core_table([(2, 1, 16, 16)], [40], 80, 16, device)
        return 0
    if args.kernels:
        kernel_table(args.kernel_shapes.split(","), chunks[0], device)
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{__import__('triton').__version__}")
    if args.core_only:
        core_table(layouts, lengths, args.tokens, chunks[0], device)
        return 0
    worst = accuracy_table(2, 2048, 16, 16, 128, 128, 64, device)
    print(f"\nworst Triton/PyTorch bf16 error ratio: {worst:.2f}")
    norm_table(args.tokens, device)
    core_table(layouts, lengths, args.tokens, chunks[0], device)
    timing_table(layouts, lengths, args.tokens, chunks, device, has_fla)
    return 0


if __name__ == "__main__":
    sys.exit(main())
