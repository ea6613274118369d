"""Training checkpoint <-> Hugging Face folder (trust_remote_code), verified by default.

    python tools/hf/convert.py export runs/tiny_cpu hf/tiny_cpu
    python tools/hf/convert.py import hf/tiny_cpu runs/imported

``export`` reads the newest complete checkpoint in (or at) the given path, at any tensor /
pipeline parallel layout, writes the folder atomically and refuses to finish when the exported
model's logits differ from the training model's beyond --tolerance on a sample batch longer
than the largest TransPoint. ``import`` writes a model-only training checkpoint
(dist_checkpointing), which trains at any tensor / pipeline / data-parallel layout. The code lives
in ``megatron_transmamba.hf`` (docs/hf.md).
"""

import argparse
import sys
import warnings

warnings.filterwarnings("ignore", message="(Transformer Engine|Apex).* not installed")

from megatron_transmamba.hf.export import export_checkpoint, import_hf  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="training checkpoint -> Hugging Face folder")
    exp.add_argument("checkpoint", help="checkpoint.save directory or one iter_XXXXXXX folder")
    exp.add_argument("output", help="Hugging Face folder to create")
    exp.add_argument("--tolerance", type=float, default=1e-3,
                     help="max abs logit difference allowed by the self-check (float32, CPU)")
    exp.add_argument("--no-verify", action="store_true", help="skip running both models")
    exp.add_argument("--max-shard-size", type=float, default=2.0, help="GiB per safetensors shard")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    imp = sub.add_parser("import", help="Hugging Face folder -> model-only training checkpoint")
    imp.add_argument("folder", help="a folder written by 'export'")
    imp.add_argument("save", help="checkpoint directory (gets iter_XXXXXXX and latest)")
    imp.add_argument("--tensor-parallel-size", type=int, default=1,
                     help="checked (the model must split at it) and recorded in the stored run "
                          "config; the checkpoint itself loads at any layout")
    imp.add_argument("--step", type=int, default=0, help="step number of the checkpoint folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            summary = export_checkpoint(args.checkpoint, args.output, not args.no_verify,
                                        args.tolerance, int(args.max_shard_size * 1024 ** 3),
                                        args.overwrite)
            diff = summary["max_abs_logit_diff"]
            check = "not verified" if diff is None else f"max abs logit difference {diff:.2e}"
            print(f"exported step {summary['step']} ({summary['tensors']} tensors) to "
                  f"{args.output}: {check}")
        else:
            path = import_hf(args.folder, args.save, args.tensor_parallel_size, args.step)
            print(f"wrote {path} (model weights only; loads at any TP / PP / DP layout)")
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, NotImplementedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
