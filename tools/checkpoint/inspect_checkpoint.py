"""Print what a training checkpoint holds, without the parallel layout that wrote it.

    python tools/checkpoint/inspect_checkpoint.py runs/tiny_cpu            # newest checkpoint
    python tools/checkpoint/inspect_checkpoint.py runs/tiny_cpu/iter_0000300 --verify
    python tools/checkpoint/inspect_checkpoint.py runs/tiny_cpu --json

Shows the step, samples and tokens seen, the layout (TP x PP x DP) that saved it, the model
section of its run config, every model tensor's full shape and dtype, what optimizer and RNG
state it carries, and its files; ``--verify`` also checks every file's size and CRC-32 against
``checkpoint.json``. Only metadata is read (no tensor data), and no process group is started.
"""

import argparse
import json
import math
import sys
import warnings

warnings.filterwarnings("ignore", message="(Transformer Engine|Apex).* not installed")

from megatron_transmamba.training import checkpoint as ckpt  # noqa: E402

_OPTIMIZER_PREFIX = "optimizer.state."


def describe(path: str, verify: bool = False) -> dict:
    """A JSON-ready description of the checkpoint at (or newest in) ``path``."""
    path = ckpt.resolve(path)
    info = ckpt.read_info(path)
    out = {"path": path, "format_version": info["format_version"], "step": info.get("step"),
           "consumed_samples": info.get("consumed_samples"),
           "tokens_seen": info.get("tokens_seen"), "saved_at": info.get("saved_at"),
           "model_only": bool(info.get("model_only")), "layout": info.get("layout", {})}
    out["model_config"] = (info.get("config") or {}).get("model", {})
    tensors = ckpt.tensor_metadata(path)
    model = {k: {"shape": list(shape), "dtype": str(dtype).replace("torch.", "")}
             for k, (shape, dtype) in tensors.items() if not k.startswith(_OPTIMIZER_PREFIX)}
    out["model_tensors"] = model
    out["model_parameters"] = sum(math.prod(t["shape"]) for t in model.values())
    kinds = sorted({k[len(_OPTIMIZER_PREFIX):].split(".", 1)[0] for k in tensors
                    if k.startswith(_OPTIMIZER_PREFIX)})
    out["optimizer_state"] = kinds                   # e.g. exp_avg, exp_avg_sq, param
    files = info.get("files", {})
    out["files"] = {name: record["bytes"] for name, record in files.items()}
    if verify:
        out["problems"] = ckpt.verify(path, checksums=True)
    return out


def _layout_text(layout: dict) -> str:
    if not layout:
        return "unknown"
    text = (f"TP={layout.get('tensor_model_parallel_size', 1)} x "
            f"PP={layout.get('pipeline_model_parallel_size', 1)} x "
            f"DP={layout.get('data_parallel_size', '?')} ({layout.get('world_size', '?')} ranks)")
    if layout.get("virtual_pipeline_model_parallel_size"):
        text += f", virtual pipeline {layout['virtual_pipeline_model_parallel_size']}"
    if layout.get("sequence_parallel"):
        text += ", sequence parallel"
    if layout.get("use_distributed_optimizer") is not None:
        text += (", distributed optimizer" if layout["use_distributed_optimizer"]
                 else ", replicated optimizer")
    return text


def format_description(d: dict) -> str:
    lines = [f"checkpoint {d['path']} (format {d['format_version']})"]
    step = f"step {d['step']}"
    if d.get("consumed_samples") is not None:
        step += (f" | {d['consumed_samples']:,} samples, {d['tokens_seen']:,} tokens seen")
    if d.get("saved_at"):
        step += f" | saved {d['saved_at']}"
    lines.append(step + (" | model weights only (no optimizer state)" if d["model_only"] else ""))
    lines.append(f"saved at layout {_layout_text(d['layout'])}; loads at any layout that "
                 "divides the model")
    if d["model_config"]:
        lines.append("model: " + ", ".join(f"{k}={v}" for k, v in sorted(d["model_config"].items())))
    lines.append(f"model tensors: {len(d['model_tensors'])}, {d['model_parameters']:,} parameters")
    width = max(map(len, d["model_tensors"]), default=0)
    for key, tensor in d["model_tensors"].items():
        lines.append(f"  {key:<{width}}  {str(tuple(tensor['shape'])):<14} {tensor['dtype']}")
    lines.append("optimizer state: " + (", ".join(d["optimizer_state"]) or "none")
                 + " per model tensor" * bool(d["optimizer_state"]))
    total = sum(d["files"].values())
    lines.append(f"files: {len(d['files'])}, {total / 2 ** 20:,.1f} MiB")
    if "problems" in d:
        lines.append("verified: sizes and CRC-32 match" if not d["problems"]
                     else "DAMAGED: " + "; ".join(d["problems"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint.save directory or one iter_XXXXXXX folder")
    parser.add_argument("--verify", action="store_true", help="check file sizes and CRC-32")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    try:
        d = describe(args.checkpoint, args.verify)
    except (FileNotFoundError, ckpt.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(d, indent=1, default=str) if args.json else format_description(d))
    return 1 if d.get("problems") else 0


if __name__ == "__main__":
    sys.exit(main())
