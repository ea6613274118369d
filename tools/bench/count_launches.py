"""Device-kernel launches and host syncs of one training step, counted on any machine (CPU too).

    python tools/bench/count_launches.py --config examples/configs/transmamba_400m.yaml \
        [--model.mixer_backend=triton] [--json] [--full-width] [--precision fp32]

Builds the config's model as the trainer does (widths shrunk unless ``--full-width``: the count
depends on the structure, not the widths), runs a warm-up step and counts the next one:
launches per layer kind (the costliest layer of each kind; for ``T`` among those with
0 < p < T), forward and backward; the embedding/LM head/loss (``head``); the optimizer step
(with gradient-buffer zeroing and finalisation); DDP's per-parameter gradient accumulation; and
host syncs inside forward/backward (``host_syncs``) and in the whole step (``host_syncs_step``).
How it counts: ``megatron_transmamba/training/launch_counter.py``; the numbers in
docs/benchmarks.md, "Kernel launches per step".
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

if not torch.cuda.is_available():   # Triton kernels run (and are counted) in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megatron_transmamba.training.config import load_run_config  # noqa: E402
from megatron_transmamba.training.launch_counter import count_training_step  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--full-width", action="store_true", help="keep the config's widths")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="the step to count (default bf16, as GPUs train; runs on a CPU too)")
    parser.add_argument("--ops", action="store_true", help="also list the ops behind each count")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_run_config(args.config, ["--checkpoint.save=null", "--training.eval_interval=0",
                                        "--logging.progress_bar=false", *overrides])
    result = count_training_step(cfg, shrink=not args.full_width, bf16=args.precision == "bf16")
    if not args.ops:
        result.pop("ops")
        for record in result["layers"]:
            record.pop("ops")
    if args.json:
        print(json.dumps(result))
        return 0
    c = result["config"]
    print(f"{args.config}: pattern {c['layer_pattern']}, backend {c['mixer_backend']}, "
          f"{c['precision']}, T = {c['seq_length']} (shrunk widths)" if c["shrunk"] else "")
    print("| part | forward | backward | total |\n|---|---|---|---|")
    for key in ("T", "M", "*", "-", "head"):
        if key in result:
            f, b = result[key]["forward"], result[key]["backward"]
            print(f"| {key} | {f} | {b} | {f + b} |")
    print(f"\noptimizer step: {result['optimizer']} launches; DDP gradient accumulation: "
          f"{result['grad_accumulation']}; launches per step: {result['launches_per_step']}; "
          f"host syncs in forward/backward: {result['host_syncs']}, in the step: "
          f"{result['host_syncs_step']} ({', '.join(f'{k} {v}' for k, v in result['sync_ops'].items())})")
    if args.ops:
        for key, ops in result["ops"].items():
            print(f"{key}: {ops}")
        for record in result["layers"]:
            print(f"layer {record['index']} {record['symbol']} p={record['transpoint']}: {record['ops']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
