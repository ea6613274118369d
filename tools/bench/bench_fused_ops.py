"""Fused mixer ops on one GPU: causal conv + SiLU and gated grouped RMSNorm, PyTorch vs Triton.

    python tools/bench/bench_fused_ops.py            # one H200: every table below
    python tools/bench/bench_fused_ops.py --smoke    # tiny shapes, CPU (TRITON_INTERPRET=1)
    python tools/bench/bench_fused_ops.py --shapes training   # every kernel variant, JSON lines
    python tools/bench/bench_fused_ops.py --shapes training --smoke   # the same, CPU, tiny

``--shapes training``: the 400M / 1.5B training shapes at micro-batch 1 (bf16): the conv over
[1, 8192, 4608] read as a column slice of the in-projection output, W = 4; the gated norm over
[1, 8192, 1536], 16 groups of 96, z a column slice, TransPoint T/2. Each variant of
``causal_conv.FWD_VARIANTS`` / ``BWD_VARIANTS`` and ``gated_rmsnorm.NORM_VARIANTS`` is timed
(conv fwd, conv bwd alone through the backward op, norm fwd, norm fwd+bwd) and printed as one
JSON line: op, variant, ms, GB/s of the op's compulsory bytes and their fraction of 4.24 TB/s.

Prints bf16 errors against the float32 reference (next to PyTorch's own bf16 error) and
forward / forward+backward times (ms, medians of triton.testing.do_bench; backward through
torch.autograd.grad) at the shapes of the TransMamba layout of NOTES (H = G = 16, P = N = 128:
conv channels H*P + 2*G*N = 6144, norm width H*P = 2048), 65,536 tokens:
- conv: PyTorch vs Triton; the Triton backward's tilings (``causal_conv._BWD``: rows per
  tile, channels per program, warps, x row shifts by register gather or by shifted loads);
  packed documents (``seq_idx``);
- norm: unpacked at p = T/2; packed documents gated by per-token positions in the kernel
  (``position_ids``), next to the previous packed path (gate applied in PyTorch, then the
  fused norm ungated).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch
import torch.nn.functional as F

from transmamba_kernels.conv import causal_conv
from transmamba_kernels.conv.causal_conv import causal_conv1d_silu_triton
from transmamba_kernels.conv.naive import causal_conv1d_silu_naive
from transmamba_kernels.norm import gated_rmsnorm as gated_norm
from transmamba_kernels.norm.gated_rmsnorm import gated_rmsnorm_triton
from transmamba_kernels.norm.naive import gated_rmsnorm_naive


def rel(ref, out):
    return ((ref.double() - out.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def bench(fn):
    if torch.cuda.is_available():
        import triton.testing
        return triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median")
    start = time.perf_counter()            # --smoke on CPU: one call, only to exercise the code
    fn()
    return (time.perf_counter() - start) * 1e3


def run_op(name, reference, implementations, make_args, grads_of):
    """Errors against ``reference`` in float32 and times of each (label, fn) in bf16."""
    args32 = make_args(torch.float32)
    args16 = [a.detach().to(torch.bfloat16).requires_grad_(True)
              if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args32]
    ref = reference(*args32)
    dout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, grads_of(args32), dout)
    rows = []
    for label, fn in implementations:
        out = fn(*args16)
        grads = torch.autograd.grad(out, grads_of(args16), dout.to(out.dtype))
        errs = [rel(ref, out)] + [rel(r, g) for r, g in zip(ref_grads, grads)]
        fwd = bench(lambda: fn(*args16))
        both = bench(lambda: torch.autograd.grad(fn(*args16), grads_of(args16), dout.to(out.dtype)))
        rows.append((label, errs, fwd, both))
    print(f"\n{name}\n")
    print("| implementation | out err | grad errs | fwd ms | fwd+bwd ms | bwd ms (difference) |")
    print("|---|---|---|---|---|---|")
    for label, errs, fwd, both in rows:
        print(f"| {label} | {errs[0]:.2e} | {', '.join(f'{e:.2e}' for e in errs[1:])} | "
              f"{fwd:.3f} | {both:.3f} | {both - fwd:.3f} |", flush=True)


def conv_tilings(x, w, b, seq_idx=None, full=True):
    """Forward+backward of the Triton conv for each backward tiling (bf16); ``full=False``: the
    default tiling with both kinds of x shifts only."""
    default = dict(causal_conv._BWD, **causal_conv.BWD_VARIANTS["tiles"])
    dout = torch.randn_like(x)
    fwd = bench(lambda: causal_conv1d_silu_triton(x, w, b, seq_idx))
    print(f"\nconv backward tilings, {list(x.shape)}, seq_idx={'yes' if seq_idx is not None else 'no'}"
          f" (forward alone {fwd:.3f} ms; default {default})\n")
    print("| rows per tile | channels | tiles per program | warps | x shifts | fwd+bwd ms | bwd ms |")
    print("|---|---|---|---|---|---|---|")
    grid = [(default["block_t"], default["block_c"], default["num_warps"], gather_x)
            for gather_x in (True, False)]
    if full and torch.cuda.is_available():
        grid += list(itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (True, False)))
    elif full:
        grid += [(16, 16, 4, True), (16, 16, 4, False)]
    try:
        for block_t, block_c, warps, gather_x in grid:
            cfg = dict(default, kernel="tiles", block_t=block_t, block_c=block_c, num_warps=warps, gather_x=gather_x)
            if block_t * block_c > 128 * 64 and warps == 4:
                continue                    # 64+ fp32 values per thread per tile: spills
            causal_conv._BWD = cfg
            try:
                both = bench(lambda: torch.autograd.grad(causal_conv1d_silu_triton(x, w, b, seq_idx),
                                                         (x, w, b), dout))
            except Exception as err:        # a tiling that does not compile is a result too
                print(f"| {block_t} | {block_c} | {cfg['tiles_per_program']} | {warps} | "
                      f"{'gather' if gather_x else 'loads'} | failed: {type(err).__name__} | |")
                continue
            print(f"| {block_t} | {block_c} | {cfg['tiles_per_program']} | {warps} | "
                  f"{'gather' if gather_x else 'loads'} | {both:.3f} | {both - fwd:.3f} |", flush=True)
    finally:
        causal_conv._BWD = default


def documents_seq_idx(batch, T, mean_length, device, seed=0):
    """seq_idx and position_ids [B, T] of rows cut into documents of random lengths."""
    g = torch.Generator().manual_seed(seed)
    seq_idx, positions = torch.empty(batch, T, dtype=torch.int32), torch.empty(batch, T, dtype=torch.long)
    doc = 0
    for row in range(batch):
        start = 0
        while start < T:
            length = min(T - start, int(torch.randint(1, 2 * mean_length, (1,), generator=g)))
            seq_idx[row, start:start + length] = doc
            positions[row, start:start + length] = torch.arange(length)
            start, doc = start + length, doc + 1
    return seq_idx.to(device), positions.to(device)


def gate_then_norm(y, z, weight, groups, eps, transpoint, position_ids):
    """The packed path before the fused per-token gate: gate in PyTorch, fused norm ungated."""
    gate = (position_ids >= transpoint)[:, :, None]
    gated = torch.where(gate, y.float() * F.silu(z.float()), y.float()).to(y.dtype)
    return gated_rmsnorm_triton(gated, z, weight, groups, eps, y.shape[1])


H200_BYTES_PER_S = 4.24e12


def report(op, variant, ms, nbytes, shape):
    gbs = nbytes / (ms * 1e-3) / 1e9
    print(json.dumps(dict(op=op, variant=variant, shape=shape, ms=round(ms, 4),
                          GB_per_s=round(gbs, 1), floor_fraction=round(gbs * 1e9 / H200_BYTES_PER_S, 3),
                          MB=round(nbytes / 1e6, 1))), flush=True)


def training_shapes(smoke: bool) -> int:
    """Every variant of the conv and gated-norm kernels at the training shapes (micro-batch 1)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # 400M / 1.5B: H*P = 1536, G = 16, N = 96 -> conv channels 1536 + 2*16*96 = 4608
    T, width, groups, N = (8192, 1536, 16, 96) if not smoke else (40, 48, 2, 6)
    conv_c, W = width + 2 * groups * N, 4
    in_width = width + conv_c + 16                              # z | xBC | dt
    dt = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    proj = torch.randn(1, T, in_width, device=dev, dtype=dt, generator=g)
    z, x = proj[..., :width], proj[..., width:width + conv_c]   # strided column slices
    w = (torch.randn(conv_c, 1, W, device=dev, generator=g) * 0.5).to(dt)
    b = (torch.randn(conv_c, device=dev, generator=g) * 0.1).to(dt)
    dout = torch.randn(1, T, conv_c, device=dev, dtype=dt, generator=g)
    shape = [1, T, conv_c]
    act = T * conv_c * 2                                        # one bf16 [1, T, C] tensor
    default_fwd, default_bwd = dict(causal_conv._FWD), dict(causal_conv._BWD)
    try:
        for name, cfg in causal_conv.FWD_VARIANTS.items():
            causal_conv._FWD = dict(cfg)
            ms = bench(lambda: torch.ops.transmamba.causal_conv1d_silu(x, w, b, None))
            report("conv_fwd", name, ms, 2 * act, shape)
        for name, cfg in causal_conv.BWD_VARIANTS.items():
            causal_conv._BWD = dict(cfg)
            ms = bench(lambda: torch.ops.transmamba.causal_conv1d_silu_backward(dout, x, w, b, None))
            report("conv_bwd", name, ms, 3 * act, shape)
    finally:
        causal_conv._FWD, causal_conv._BWD = default_fwd, default_bwd
    y = torch.randn(1, T, width, device=dev, dtype=dt, generator=g)
    wn = torch.rand(width, device=dev, generator=g).to(dt) + 0.5
    dnorm = torch.randn(1, T, width, device=dev, dtype=dt, generator=g)
    p = T // 2
    norm_act = T * width * 2
    shape = [1, T, width]
    # compulsory bytes: fwd reads y, z (gated rows) and writes out; bwd reads y, z, dout and
    # writes dy, dz (rstd and the partials are small)
    fwd_bytes = 2 * norm_act + (T - p) * width * 2
    bwd_bytes = 4 * norm_act + (T - p) * width * 2
    default_norm = dict(gated_norm._NORM)
    try:
        for name, cfg in gated_norm.NORM_VARIANTS.items():
            gated_norm._NORM = dict(cfg)
            fwd = lambda: torch.ops.transmamba.gated_rmsnorm(y, z, wn, groups, 1e-5, p, None, None)
            report("gated_norm_fwd", name, bench(fwd), fwd_bytes, shape)
            _, rstd = fwd()
            bwd = lambda: torch.ops.transmamba.gated_rmsnorm_backward(dnorm, y, z, wn, rstd, groups,
                                                                       p, None, None)
            report("gated_norm_bwd", name, bench(bwd), bwd_bytes, shape)
            both = lambda: gated_norm._gated_rmsnorm_backward_op(
                dnorm, y, z, wn, fwd()[1], groups, p, None, None)
            report("gated_norm_fwd_bwd", name, bench(both), fwd_bytes + bwd_bytes, shape)
    finally:
        gated_norm._NORM = default_norm
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for a CPU check")
    parser.add_argument("--shapes", choices=["default", "training"], default="default",
                        help="training: every kernel variant at the micro-batch-1 training shapes")
    args = parser.parse_args(argv)
    if args.shapes == "training":
        return training_shapes(args.smoke)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
              f"{__import__('triton').__version__}")
    B, T, conv_c, norm_c, G, mean_doc = (8, 8192, 6144, 2048, 16, 1024) if not args.smoke else \
        (2, 40, 24, 16, 2, 9)

    def conv_args(dtype, seq_idx=None):
        x = torch.randn(B, T, conv_c, device=dev, dtype=dtype, requires_grad=True)
        w = (torch.randn(conv_c, 1, 4, device=dev) * 0.5).requires_grad_(True)
        b = (torch.randn(conv_c, device=dev) * 0.1).requires_grad_(True)
        return [x, w, b, seq_idx]

    seq_idx, positions = documents_seq_idx(B, T, mean_doc, dev)
    conv_grads = lambda a: [a[0], a[1], a[2]]
    run_op(f"causal conv1d + SiLU, [{B}, {T}, {conv_c}], W = 4", causal_conv1d_silu_naive,
           [("PyTorch bf16", causal_conv1d_silu_naive), ("Triton bf16", causal_conv1d_silu_triton)],
           conv_args, conv_grads)
    run_op(f"causal conv1d + SiLU, [{B}, {T}, {conv_c}], W = 4, packed documents (mean {mean_doc})",
           causal_conv1d_silu_naive, [("Triton bf16", causal_conv1d_silu_triton)],
           lambda dtype: conv_args(dtype, seq_idx), conv_grads)
    # the model's dtypes: bf16 activations and bf16 conv weight and bias (params_dtype)
    x16, w16, b16 = (t.detach().to(torch.bfloat16).requires_grad_(True)
                     for t in conv_args(torch.bfloat16)[:3])
    conv_tilings(x16, w16, b16)
    conv_tilings(x16, w16, b16, seq_idx, full=False)

    def norm_args(dtype, position_ids=None):
        y = torch.randn(B, T, norm_c, device=dev, dtype=dtype, requires_grad=True)
        z = torch.randn(B, T, norm_c, device=dev, dtype=dtype, requires_grad=True)
        w = (torch.rand(norm_c, device=dev) + 0.5).requires_grad_(True)
        return [y, z, w, G, 1e-5, T // 2] + ([position_ids] if position_ids is not None else [])

    norm_grads = lambda a: [a[0], a[1], a[2]]
    run_op(f"gated grouped RMSNorm, [{B}, {T}, {norm_c}], G = {G}, p = T/2", gated_rmsnorm_naive,
           [("PyTorch bf16", gated_rmsnorm_naive), ("Triton bf16", gated_rmsnorm_triton)],
           norm_args, norm_grads)
    p_doc = mean_doc // 2
    run_op(f"gated grouped RMSNorm, [{B}, {T}, {norm_c}], G = {G}, packed documents (mean "
           f"{mean_doc}), p = {p_doc} per document", gated_rmsnorm_naive,
           [("PyTorch bf16", gated_rmsnorm_naive),
            ("PyTorch gate + Triton norm (previous packed path)", gate_then_norm),
            ("Triton bf16, position_ids", gated_rmsnorm_triton)],
           lambda dtype: norm_args(dtype, positions)[:5] + [p_doc, positions], norm_grads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
