"""Per-kernel GPU time of one Triton SSD forward+backward (torch.profiler table).

    python tools/bench/profile_ssd.py --batch 8 --seq-len 8192 --chunk 128
"""

import argparse
import math
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from transmamba_kernels.ssd import chunk
from transmamba_kernels.ssd.chunk import chunk_ssd_triton


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--state-dim", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=128)
    args = parser.parse_args(argv)
    Bt, T, H, G, P, N = args.batch, args.seq_len, args.heads, args.groups, args.head_dim, args.state_dim
    dev = "cuda"
    x = torch.randn(Bt, T, H, P, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dt = torch.nn.functional.softplus(torch.randn(Bt, T, H, device=dev) - 3).requires_grad_(True)
    A = -torch.exp(torch.rand(H, device=dev) * math.log(16))
    B = (torch.randn(Bt, T, G, N, device=dev) * N ** -0.5).bfloat16().requires_grad_(True)
    C = (torch.randn(Bt, T, G, N, device=dev) * N ** -0.5).bfloat16().requires_grad_(True)
    D = torch.ones(H, device=dev)
    dy = torch.randn_like(x)
    for _ in range(3):
        torch.autograd.grad(chunk_ssd_triton(x, dt, A, B, C, args.chunk, D=D), (x, dt, B, C), dy)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            torch.autograd.grad(chunk_ssd_triton(x, dt, A, B, C, args.chunk, D=D), (x, dt, B, C), dy)
        torch.cuda.synchronize()
    print(f"B={Bt} T={T} H={H} G={G} P={P} N={N} chunk={args.chunk}, 5 forward+backward calls")
    print(f"  design {chunk.DESIGN}")
    for name in sorted(n for n in dir(chunk) if n.endswith("_kernel")):
        config = getattr(getattr(chunk, name), "best_config", None)
        if config is not None:
            print(f"  {name}: autotuned {config}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    sys.exit(main())
