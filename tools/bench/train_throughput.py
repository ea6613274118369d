"""Training throughput of run configs: a markdown table of step time and tokens/s.

    python tools/bench/train_throughput.py examples/configs/transmamba_400m.yaml \
        examples/configs/transformer_400m.yaml --steps 12 --warmup 4 --micro-batch-size 1

Each config trains ``--steps`` optimizer steps on the embedded corpus (one micro-batch per
step, no evaluation, no checkpoints); the median step time over the steps after ``--warmup``
gives tokens/s. Extra ``--section.key=value`` arguments override every config.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from megatron_transmamba.training.config import load_run_config
from megatron_transmamba.training.pretrain import pretrain


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    args, overrides = parser.parse_known_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")
    rows = []
    for path in args.configs:
        cfg = load_run_config(path, [
            f"--training.train_iters={args.steps}", "--training.lr_warmup_iters=1",
            "--training.eval_interval=0", "--training.log_interval=1000000",
            f"--training.micro_batch_size={args.micro_batch_size}", "--training.global_batch_size=null",
            "--checkpoint.save=null", "--logging.progress_bar=false", *overrides])
        result = pretrain(cfg)
        times = [result.step_seconds[s] for s in sorted(result.step_seconds) if s > args.warmup]
        median = statistics.median(times)
        rows.append((path.rsplit("/", 1)[-1], result.num_parameters, cfg.model.get("seq_length"),
                     args.micro_batch_size, median, result.tokens_per_step / median,
                     result.train_losses[max(result.train_losses)]))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{device}, torch {torch.__version__}, {args.steps} steps, median of steps > {args.warmup}\n")
    print("| config | parameters | T | micro batch | step (ms) | tokens/s | last loss |")
    print("|---|---|---|---|---|---|---|")
    for name, params, T, mb, sec, tps, loss in rows:
        print(f"| {name} | {params / 1e6:.1f}M | {T} | {mb} | {sec * 1e3:.1f} | {tps:,.0f} | {loss:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
