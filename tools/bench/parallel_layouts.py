"""Train one config at several parallel layouts and compare them: losses against the one-GPU
run, step time, tokens/s, TFLOP/s per GPU, MFU and peak memory per GPU.

One layout, under torchrun (rank 0 writes ``<out>/<name>.json``):

    torchrun --nproc_per_node=4 tools/bench/parallel_layouts.py run --name tp2_pp2 \
        --out runs/layouts examples/configs/transmamba_1p5b.yaml --steps 20 \
        --parallel.tensor_model_parallel_size=2 --parallel.pipeline_model_parallel_size=2

The table of every ``<out>/*.json`` (the losses compared with ``--reference``'s):

    python tools/bench/parallel_layouts.py table runs/layouts --reference 1gpu

``tools/bench/parallel_layouts.sh`` runs named layouts one after another. Every layout must
use the same global batch (gradient accumulation makes up the difference), so each step sees
the same data as the reference run; the initial model does not depend on the layout. The
step time is the median over the steps after ``--warmup``.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import statistics
import sys

import torch


def run(args, overrides: list[str]) -> int:
    from megatron_transmamba.training.config import load_run_config
    from megatron_transmamba.training.metrics import throughput
    from megatron_transmamba.training.pretrain import pretrain
    cfg = load_run_config(args.config, [
        f"--training.train_iters={args.steps}", f"--training.lr_warmup_iters={max(1, args.steps // 4)}",
        "--training.eval_interval=0",
        "--training.log_interval=1000000", "--checkpoint.save=null",
        "--logging.progress_bar=false", *overrides])
    result = pretrain(cfg)
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    steps = sorted(result.train_losses)
    times = [result.step_seconds[s] for s in steps if s > args.warmup]
    median = statistics.median(times)
    speed = throughput(result.tokens_per_step, median, result.flops_per_token,
                       result.layout["world_size"], result.peak_tflops)
    tokens_per_s, tflops = speed.tokens_per_s, speed.tflops_per_gpu
    import megatron.core
    import triton
    record = {
        "name": args.name, "config": args.config, "overrides": overrides,
        "layout": result.layout, "parameters": result.num_parameters,
        "tokens_per_step": result.tokens_per_step, "seq_length": cfg.model.get("seq_length"),
        "losses": [result.train_losses[s] for s in steps],
        "grad_norms": [result.grad_norms[s] for s in steps],
        "step_seconds": [result.step_seconds[s] for s in steps],
        "median_step_seconds": median, "tokens_per_s": tokens_per_s,
        "tflops_per_gpu": tflops,
        "mfu": speed.mfu,
        "peak_memory_bytes": result.peak_memory_bytes,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "megatron-core": megatron.core.__version__},
        "date": datetime.date.today().isoformat(),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"{args.name}: {median * 1e3:.1f} ms/step, {tokens_per_s:,.0f} tokens/s, "
          f"{tflops:.1f} TFLOP/s per GPU, peak {result.peak_memory_bytes / 2**30:.1f} GiB",
          flush=True)
    return 0


def describe(layout: dict) -> str:
    text = f"TP={layout['tensor_model_parallel_size']}"
    text += f" x PP={layout['pipeline_model_parallel_size']}"
    if layout.get("virtual_pipeline_model_parallel_size"):
        text += f" (virtual {layout['virtual_pipeline_model_parallel_size']})"
    return text + f" x DP={layout['data_parallel_size']}"


def table(args) -> int:
    records = {}
    for path in sorted(glob.glob(os.path.join(args.folder, "*.json"))):
        with open(path) as f:
            record = json.load(f)
        records[record["name"]] = record
    if not records:
        print(f"no results in {args.folder}", file=sys.stderr)
        return 1
    ref = records.get(args.reference)
    first = next(iter(records.values()))
    print(f"{first['device']}, torch {first['versions']['torch']}, triton "
          f"{first['versions']['triton']}, megatron-core {first['versions']['megatron-core']}, "
          f"{first['date']}; {first['parameters'] / 1e6:,.1f}M parameters, T = "
          f"{first['seq_length']}, {first['tokens_per_step']:,} tokens per step, "
          f"{len(first['losses'])} steps\n")
    print("| run | layout | GPUs | recompute | step (ms) | tokens/s | TFLOP/s per GPU | MFU | "
          "peak memory per GPU (GiB) | scaling efficiency | max abs loss diff vs "
          f"{args.reference} | last loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in records.items():
        world = r["layout"]["world_size"]
        efficiency = diff = "-"
        if ref is not None:
            efficiency = f"{r['tokens_per_s'] / (world * ref['tokens_per_s'] / ref['layout']['world_size']):.2f}"
            if len(r["losses"]) == len(ref["losses"]):
                diff = f"{max(abs(a - b) for a, b in zip(r['losses'], ref['losses'])):.2e}"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"| {name} | {describe(r['layout'])} | {world} | {r['layout'].get('recompute', '-')} | "
              f"{r['median_step_seconds'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['tflops_per_gpu']:.1f} | {mfu} | {r['peak_memory_bytes'] / 2**30:.1f} | "
              f"{efficiency} | {diff} | {r['losses'][-1]:.4f} |")
    if ref is not None:
        print(f"\nlosses of {args.reference}: " + ", ".join(f"{x:.4f}" for x in ref["losses"]))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train one layout (under torchrun) and write <out>/<name>.json")
    r.add_argument("config")
    r.add_argument("--name", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--warmup", type=int, default=3, help="steps left out of the median step time")
    t = sub.add_parser("table", help="markdown table of the results in a folder")
    t.add_argument("folder")
    t.add_argument("--reference", default="1gpu")
    args, overrides = parser.parse_known_args(argv)
    if args.command == "table":
        if overrides:
            parser.error(f"unknown arguments {overrides}")
        return table(args)
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")
    return run(args, overrides)


if __name__ == "__main__":
    sys.exit(main())
