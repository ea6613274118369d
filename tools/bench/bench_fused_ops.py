"""Fused mixer ops on one GPU: causal conv + SiLU and gated grouped RMSNorm, PyTorch vs Triton.

    python tools/bench/bench_fused_ops.py

Prints bf16 errors against the float32 reference (next to PyTorch's own bf16 error) and
forward / forward+backward times (ms, medians of triton.testing.do_bench) at the shapes of
the TransMamba layout of NOTES (H = G = 16, P = N = 128: conv channels H*P + 2*G*N = 6144,
norm width H*P = 2048), 65,536 tokens.
"""

from __future__ import annotations

import sys

import torch
import triton.testing

from transmamba_kernels.conv.causal_conv import causal_conv1d_silu_triton
from transmamba_kernels.conv.naive import causal_conv1d_silu_naive
from transmamba_kernels.norm.gated_rmsnorm import gated_rmsnorm_triton
from transmamba_kernels.norm.naive import gated_rmsnorm_naive


def rel(ref, out):
    return ((ref.double() - out.double()).norm() / ref.double().norm()).item()


def bench(fn):
    return triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median")


def run_op(name, naive, fused, make_args, grads_of):
    args32 = make_args(torch.float32)
    args16 = [a.detach().to(torch.bfloat16).requires_grad_(True)
              if isinstance(a, torch.Tensor) else a for a in args32]
    ref = naive(*args32)
    dout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, grads_of(args32), dout)
    rows = []
    for label, fn in (("PyTorch bf16", naive), ("Triton bf16", fused)):
        out = fn(*args16)
        grads = torch.autograd.grad(out, grads_of(args16), dout.to(out.dtype))
        errs = [rel(ref, out)] + [rel(r, g) for r, g in zip(ref_grads, grads)]
        fwd = bench(lambda: fn(*args16))
        both = bench(lambda: torch.autograd.grad(fn(*args16), grads_of(args16), dout.to(out.dtype)))
        rows.append((label, errs, fwd, both))
    print(f"\n{name}\n")
    print("| implementation | out err | grad errs | fwd ms | fwd+bwd ms |")
    print("|---|---|---|---|---|")
    for label, errs, fwd, both in rows:
        print(f"| {label} | {errs[0]:.2e} | {', '.join(f'{e:.2e}' for e in errs[1:])} | {fwd:.3f} | {both:.3f} |")


def main() -> int:
    dev = "cuda"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    B, T = 8, 8192

    def conv_args(dtype):
        x = torch.randn(B, T, 6144, device=dev, dtype=dtype, requires_grad=True)
        w = (torch.randn(6144, 1, 4, device=dev) * 0.5).requires_grad_(True)
        b = (torch.randn(6144, device=dev) * 0.1).requires_grad_(True)
        return [x, w, b]

    run_op("causal conv1d + SiLU, [8, 8192, 6144], W = 4", causal_conv1d_silu_naive,
           causal_conv1d_silu_triton, conv_args, lambda a: [a[0], a[1], a[2]])

    def norm_args(dtype):
        y = torch.randn(B, T, 2048, device=dev, dtype=dtype, requires_grad=True)
        z = torch.randn(B, T, 2048, device=dev, dtype=dtype, requires_grad=True)
        w = (torch.rand(2048, device=dev) + 0.5).requires_grad_(True)
        return [y, z, w, 16, 1e-5, T // 2]

    run_op("gated grouped RMSNorm, [8, 8192, 2048], G = 16, p = T/2", gated_rmsnorm_naive,
           gated_rmsnorm_triton, norm_args, lambda a: [a[0], a[1], a[2]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
