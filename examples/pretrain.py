"""Pretrain a TransMamba language model (launch with torchrun, even for one process).

    torchrun --standalone --nproc_per_node=1 examples/pretrain.py \
        --config examples/configs/tiny_cpu.yaml --training.train_iters=300

Any ``--section.key=value`` after the config file overrides a YAML value; ``--resume``
continues from the newest complete checkpoint in ``checkpoint.save``. Launch tensor x pipeline
parallel size (x data-parallel size) processes, e.g. ``--nproc_per_node=2`` with
``--parallel.tensor_model_parallel_size=2``; a layout that does not fit the world size or the
model is reported by every rank before any process group is created. ``--check N`` only
checks the config for a launch of N processes, in this one process, and exits (0, or 2 with
the one-line error): ``examples/quickstart.sh`` runs it before torchrun, so a config error is
not followed by torchrun's own failure report.
"""

import argparse
import os
import sys

from megatron_transmamba.training.config import load_run_config
from megatron_transmamba.training.pretrain import check_run_config, pretrain


def wait_for_other_ranks(key: str, timeout_s: float = 30.0) -> None:
    """torchrun stops every rank once one exits. Before exiting with an error, wait (at most
    ``timeout_s``) until every rank has reached the same point on the launcher's store, so that
    each one prints its error instead of being cut short."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1 or "MASTER_ADDR" not in os.environ:
        return
    import time
    from datetime import timedelta

    import torch.distributed as dist
    key = f"megatron_transmamba/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{key}"
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              is_master=False, timeout=timedelta(seconds=timeout_s))
        store.add(key, 1)
        deadline = time.monotonic() + timeout_s
        while store.add(key, 0) < world and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:  # no store to wait on: exit at once
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML run config (default: built-in defaults)")
    parser.add_argument("--resume", action="store_true", help="same as --checkpoint.resume=true")
    parser.add_argument("--check", type=int, metavar="N",
                        help="only check the config for N processes, then exit")
    args, overrides = parser.parse_known_args(argv)
    if args.resume:
        overrides.append("--checkpoint.resume=true")
    try:
        cfg = load_run_config(args.config, overrides)
        check_run_config(cfg, args.check or int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError as err:
        where = "config" if args.check else f"rank {os.environ.get('RANK', 0)}"
        print(f"error ({where}): {err}", file=sys.stderr, flush=True)
        if not args.check:
            wait_for_other_ranks("config_error")
        return 2
    if args.check:
        return 0
    result = pretrain(cfg)
    if result.valid_losses and int(os.environ.get("RANK", 0)) == 0:
        first, last = min(result.valid_losses), max(result.valid_losses)
        print(f"validation loss {result.valid_losses[first]:.4f} (step {first}) -> "
              f"{result.valid_losses[last]:.4f} (step {last}) in {result.seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
