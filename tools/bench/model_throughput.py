"""Training throughput of models of one shape, in one process: step time, tokens/s, MFU, memory,
host and device time per step, and each model's step time relative to the Transformer's.

    python tools/bench/model_throughput.py --name h200_400m --seq-lengths 8192,32768 \
        --micro-batch-sizes 1,4 --variants eager,compile,cuda_graphs --steps 8 --warmup 3 \
        --time-budget-s 540 --model.mixer_backend=triton --model.ssd_chunk_size=64

Every (T, micro-batch, variant, config) trains ``--steps`` optimizer steps plus one profiled
step on the embedded corpus (one micro-batch per step, no evaluation, no checkpoints); the step
time is the median of the steps after ``--warmup``. Variants: ``eager``, ``compile``
(``training.compile``), ``cuda_graphs`` and ``compile+cuda_graphs``. ``--micro-batch-sizes
auto`` runs 1, then doubles until a run runs out of memory. A run that fails or runs out of
memory is recorded with its one-line error and the next one runs; once ``--time-budget-s`` has
passed, the remaining runs are recorded as skipped. ``<out-dir>/<name>.json`` holds the records
and a markdown table is printed. ``ratio_to_transformer`` is a run's step time over the step
time of the Transformer config (the one whose pattern has only ``*`` and ``-`` layers) at the
same T, micro-batch and variant. Extra ``--section.key=value`` arguments override every run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

import torch

DEFAULT_CONFIGS = ("examples/configs/transmamba_400m.yaml", "examples/configs/transformer_400m.yaml",
                   "examples/configs/mamba2_400m.yaml", "examples/configs/hybrid_400m.yaml")
VARIANTS = {"eager": (False, False), "compile": (True, False), "cuda_graphs": (False, True),
            "compile+cuda_graphs": (True, True)}
MEASURED_MATMUL_PEAK = 788.0    # bf16 TFLOP/s of one H200, 8192^3 (shared/NOTES.md)
MAX_AUTO_MICRO_BATCH = 256


def _one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


def _free_memory() -> None:
    from megatron_transmamba.parallel.initialize import destroy_distributed
    if torch.distributed.is_initialized():
        destroy_distributed()
    torch._dynamo.reset()           # compiled graphs of the previous models
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def is_transformer(pattern: str) -> bool:
    return set(pattern) <= set("*-|")


def run_one(path: str, seq_length: int, micro_batch: int, variant: str, args,
            overrides: list[str]) -> dict:
    """Train one run and return its record (status ok, oom or error)."""
    from megatron_transmamba.training.config import load_run_config
    from megatron_transmamba.training.metrics import throughput
    from megatron_transmamba.training.pretrain import pretrain
    compile_, graphs = VARIANTS[variant]
    record = {"config": path, "T": seq_length, "micro_batch": micro_batch, "variant": variant,
              "status": "ok", "error": None}
    profile_dir = tempfile.mkdtemp(prefix="model_throughput_")
    result = None
    try:
        cfg = load_run_config(path, [
            f"--model.seq_length={seq_length}", f"--training.train_iters={args.steps + 1}",
            "--training.lr_warmup_iters=1", "--training.eval_interval=0",
            "--training.log_interval=1000000", f"--training.micro_batch_size={micro_batch}",
            "--training.global_batch_size=null", f"--training.compile={str(compile_).lower()}",
            f"--training.cuda_graphs={str(graphs).lower()}", "--checkpoint.save=null",
            "--logging.progress_bar=false", "--logging.profile=true",
            f"--logging.profile_step_start={args.steps + 1}",
            f"--logging.profile_step_end={args.steps + 1}", f"--logging.profile_dir={profile_dir}",
            *overrides])
        record["layer_pattern"] = cfg.model.get("layer_pattern")
        result = pretrain(cfg)
    except Exception as error:        # recorded; the next run goes on
        record.update(status="oom" if _is_oom(error) else "error", error=_one_line(error))
    # after the except clause, so the traceback (and the tensors its frames hold) is gone
    _free_memory()
    shutil.rmtree(profile_dir, ignore_errors=True)
    if result is None:
        return record
    steps = sorted(result.step_seconds)
    timed = [result.step_seconds[s] for s in steps if args.warmup < s <= args.steps]
    median = statistics.median(timed)
    speed = throughput(result.tokens_per_step, median, result.flops_per_token,
                       result.layout["world_size"], args.peak_tflops)
    on_gpu = torch.cuda.is_available()
    profile = result.profile or {}
    record.update(
        parameters=result.num_parameters, tokens_per_step=result.tokens_per_step,
        step_ms=median * 1e3, tokens_per_s=speed.tokens_per_s,
        model_tflops_per_gpu=speed.tflops_per_gpu,
        mfu=speed.mfu if on_gpu else None,
        mfu_measured_matmul_peak=(speed.tflops_per_gpu / args.matmul_peak_tflops
                                  if on_gpu else None),
        peak_gib=result.peak_memory_bytes / 2**30 if on_gpu else None,
        host_ms_per_step=profile.get("host_ms"), device_ms_per_step=profile.get("device_ms"),
        launches_per_step=profile.get("launches"),
        host_launch_calls_per_step=profile.get("host_launch_calls"),
        profiled_step_ms=profile.get("wall_ms"),
        final_loss=result.train_losses[max(result.train_losses)],
        losses=[result.train_losses[s] for s in sorted(result.train_losses)],
        step_seconds=[result.step_seconds[s] for s in steps])
    return record


def add_ratios(records: list[dict]) -> dict:
    """Each record's step time over the Transformer's at its T, micro-batch and variant."""
    reference = {(r["T"], r["micro_batch"], r["variant"]): r["step_ms"] for r in records
                 if r["status"] == "ok" and is_transformer(r.get("layer_pattern") or "x")}
    ratios = {}
    for r in records:
        ref = reference.get((r["T"], r["micro_batch"], r["variant"]))
        r["ratio_to_transformer"] = (r["step_ms"] / ref if ref and r["status"] == "ok"
                                     else None)
        key = f"{os.path.basename(r['config'])} T={r['T']} mb={r['micro_batch']} {r['variant']}"
        ratios[key] = r["ratio_to_transformer"]
    return ratios


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def table(records: list[dict]) -> str:
    lines = ["| config | T | micro batch | variant | status | step (ms) | tokens/s | TFLOP/s | "
             "MFU (989) | MFU (788) | peak GiB | host ms | device ms | launches | "
             "vs Transformer | last loss |", "|" + "---|" * 16]
    for r in records:
        lines.append(
            f"| {os.path.basename(r['config'])} | {r['T']} | {r['micro_batch']} | {r['variant']} | "
            f"{r['status'] if r['status'] == 'ok' else r['status'] + ': ' + (r['error'] or '')} | "
            f"{_fmt(r.get('step_ms'), '.1f')} | {_fmt(r.get('tokens_per_s'), ',.0f')} | "
            f"{_fmt(r.get('model_tflops_per_gpu'), '.1f')} | {_fmt(r.get('mfu'), '.1f', 100)} | "
            f"{_fmt(r.get('mfu_measured_matmul_peak'), '.1f', 100)} | "
            f"{_fmt(r.get('peak_gib'), '.1f')} | {_fmt(r.get('host_ms_per_step'), '.1f')} | "
            f"{_fmt(r.get('device_ms_per_step'), '.1f')} | "
            f"{_fmt(r.get('launches_per_step'), ',.0f')} | "
            f"{_fmt(r.get('ratio_to_transformer'), '.2f')} | {_fmt(r.get('final_loss'), '.4f')} |")
    return "\n".join(lines)


def _versions() -> dict:
    import megatron.core
    out = {"torch": torch.__version__, "megatron-core": megatron.core.__version__,
           "python": sys.version.split()[0], "triton": None}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def _git_commit() -> Optional[str]:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def render(paths: list[str]) -> str:
    """The markdown table of result files (``--render docs/results/a.json ...``), in order."""
    records = []
    for path in paths:
        with open(path) as f:
            records += json.load(f)["records"]
    return table(records)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--render"]:
        print(render(argv[1:]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help="comma-separated run configs of one shape")
    parser.add_argument("--seq-lengths", default="8192,32768")
    parser.add_argument("--micro-batch-sizes", default="1,4",
                        help="comma-separated, or 'auto': 1, then doubling until out of memory")
    parser.add_argument("--variants", default="eager,compile,cuda_graphs",
                        help=f"comma-separated of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=8, help="timed and warm-up steps")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    parser.add_argument("--name", default="model_throughput")
    parser.add_argument("--out-dir", default="docs/results")
    parser.add_argument("--time-budget-s", type=float, default=None)
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="per-GPU peak for MFU (bf16 dense of an H100/H200)")
    parser.add_argument("--matmul-peak-tflops", type=float, default=MEASURED_MATMUL_PEAK)
    args, overrides = parser.parse_known_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")
    bad = [o for o in overrides if not o.startswith("--") or "." not in o.split("=", 1)[0]]
    if bad:
        parser.error(f"unknown arguments {bad} (overrides are --section.key=value)")
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; expected {', '.join(VARIANTS)}")
    configs = [c for c in args.configs.split(",") if c]
    auto = args.micro_batch_sizes.strip() == "auto"
    micro_batches = [1] if auto else _int_list(args.micro_batch_sizes)

    start = time.time()
    records: list[dict] = []

    def over_budget() -> bool:
        return args.time_budget_s is not None and time.time() - start > args.time_budget_s

    out, out_path = None, os.path.join(args.out_dir, f"{args.name}.json")

    def save() -> None:
        """Write the records so far: a run stopped by its time limit keeps the finished ones.
        Sorted by T, micro-batch and variant ('auto' finds its sizes config by config)."""
        nonlocal out
        records.sort(key=lambda r: (r["T"], r["micro_batch"], variants.index(r["variant"])))
        ratios = add_ratios(records)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        out = {"name": args.name, "device": device, "versions": _versions(),
               "git": _git_commit(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(shlex.quote(a) for a in [sys.argv[0], *argv]),
               "steps": args.steps, "warmup": args.warmup, "overrides": overrides,
               "peak_tflops": args.peak_tflops, "matmul_peak_tflops": args.matmul_peak_tflops,
               "seconds": time.time() - start, "ratio_to_transformer": ratios,
               "records": records}
        os.makedirs(args.out_dir, exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(out, f, indent=1)

    # variant outermost: a failed CUDA graph capture can leave the process's CUDA state
    # unusable, so list cuda_graphs last and the other variants are measured first
    for variant in variants:
        for seq_length in _int_list(args.seq_lengths):
            for path in configs:
                sizes = list(micro_batches)
                while sizes:
                    micro_batch = sizes.pop(0)
                    if over_budget():
                        records.append({"config": path, "T": seq_length,
                                        "micro_batch": micro_batch, "variant": variant,
                                        "status": "skipped", "error": "time budget exceeded"})
                        continue
                    print(f"== {path} T={seq_length} micro-batch {micro_batch} {variant}",
                          flush=True)
                    record = run_one(path, seq_length, micro_batch, variant, args, overrides)
                    records.append(record)
                    save()
                    print(f"== {record['status']}"
                          + (f" {record['step_ms']:.1f} ms a step" if record["status"] == "ok"
                             else f" {record['error']}"), flush=True)
                    if auto and record["status"] == "ok" and micro_batch < MAX_AUTO_MICRO_BATCH:
                        sizes.append(2 * micro_batch)
    save()
    device = out["device"]
    print(f"\n{device}, torch {out['versions']['torch']}, triton {out['versions']['triton']}, "
          f"megatron-core {out['versions']['megatron-core']}, {out['date']}, git {out['git']}; "
          f"median of steps {args.warmup + 1}-{args.steps}; {out_path}\n")
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
