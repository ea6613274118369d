"""Pretrain a TransMamba language model (launch with torchrun, even for one process).

    torchrun --standalone --nproc_per_node=1 examples/pretrain.py \
        --config examples/configs/tiny_cpu.yaml --training.train_iters=300

Any ``--section.key=value`` after the config file overrides a YAML value; ``--resume``
continues from the newest complete checkpoint in ``checkpoint.save``. Launch tensor x pipeline
parallel size (x data-parallel size) processes, e.g. ``--nproc_per_node=2`` with
``--parallel.tensor_model_parallel_size=2``; a layout that does not fit the world size or the
model is reported by every rank before any process group is created.
"""

import argparse
import os
import sys

from megatron_transmamba.training.config import load_run_config
from megatron_transmamba.training.pretrain import check_run_config, pretrain


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML run config (default: built-in defaults)")
    parser.add_argument("--resume", action="store_true", help="same as --checkpoint.resume=true")
    args, overrides = parser.parse_known_args(argv)
    if args.resume:
        overrides.append("--checkpoint.resume=true")
    try:
        cfg = load_run_config(args.config, overrides)
        check_run_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError as err:
        print(f"error (rank {os.environ.get('RANK', 0)}): {err}", file=sys.stderr)
        return 2
    result = pretrain(cfg)
    if result.valid_losses:
        first, last = min(result.valid_losses), max(result.valid_losses)
        print(f"validation loss {result.valid_losses[first]:.4f} (step {first}) -> "
              f"{result.valid_losses[last]:.4f} (step {last}) in {result.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
