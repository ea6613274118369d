"""Bus bandwidth of the collectives tensor and data parallelism use, on this machine's GPUs:

    torchrun --nproc_per_node=4 tools/bench/collective_bandwidth.py [--mib 64]

Prints a table of all-reduce, all-gather and reduce-scatter times and bus bandwidths (NCCL's
definition: all-reduce moves 2 (n-1)/n of the buffer per rank, the others (n-1)/n) for a
bf16 buffer of --mib MiB. A TP layout that is slower than one GPU usually shows here first.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    n, rank = dist.get_world_size(), dist.get_rank()
    numel = args.mib * 2**20 // 2
    full = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
    part = torch.empty(numel // n, device="cuda", dtype=torch.bfloat16)
    ops = {
        "all_reduce": (lambda: dist.all_reduce(full), 2 * (n - 1) / n),
        "all_gather": (lambda: dist.all_gather_into_tensor(full, part), (n - 1) / n),
        "reduce_scatter": (lambda: dist.reduce_scatter_tensor(part, full), (n - 1) / n),
    }
    rows = []
    for name, (op, factor) in ops.items():
        for _ in range(3):
            op()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.iters):
            op()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / args.iters
        rows.append((name, ms, factor * numel * 2 / (ms / 1e3) / 1e9))
    if rank == 0:
        print(f"\n{n} x {torch.cuda.get_device_name()}, bf16 buffer {args.mib} MiB, NCCL "
              f"{'.'.join(map(str, torch.cuda.nccl.version()))}\n")
        print("| collective | ms | bus bandwidth (GB/s) |\n|---|---|---|")
        for name, ms, bw in rows:
            print(f"| {name} | {ms:.3f} | {bw:.1f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
