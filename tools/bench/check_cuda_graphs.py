"""GPU self-check of training.cuda_graphs and training.compile: a tiny model trains 3 steps
eagerly and with each option; the losses must agree within 1e-3 relative (bf16).

    MTM_SKIP_SETUP=1 python tools/bench/check_cuda_graphs.py            # triton mixer backend
    python tools/bench/check_cuda_graphs.py --backends torch,triton
    python tools/bench/check_cuda_graphs.py --backends triton --variants cuda_graphs

Every layer kind (``T-M-*-``), T = 256 with the TransPoint inside a chunk, micro-batch 2, two
micro-batches a step (gradient accumulation replays each graph twice a step). Prints one line
per run (losses, last step's time) and exits 1 if any run fails or differs from eager. Each
run has its own process (a failed capture leaves a process's CUDA state unusable). Extra
``--section.key=value`` arguments override every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback

import torch

MODEL = dict(layer_pattern="T-M-*-", hidden_size=256, ffn_hidden_size=512,
             num_attention_heads=4, mamba_num_heads=4, mamba_num_groups=4, mamba_head_dim=64,
             mamba_state_dim=64, seq_length=256, transpoint_schedule="fixed",
             transpoint_values=[100], ssd_chunk_size=64)
RESULT = "check_cuda_graphs result: "
VARIANTS = {"eager": (False, False), "cuda_graphs": (False, True), "compile": (True, False),
            "compile+cuda_graphs": (True, True)}


def train(backend: str, variant: str, overrides: list[str]):
    from megatron_transmamba.training.config import build_run_config, merge, parse_overrides
    from megatron_transmamba.training.pretrain import pretrain
    compile_, graphs = VARIANTS[variant]
    cfg = build_run_config(merge({
        "model": {**MODEL, "mixer_backend": backend},
        "data": {"tokenizer": "byte"},
        "training": {"micro_batch_size": 2, "global_batch_size": 4, "train_iters": 3,
                     "lr_warmup_iters": 1, "eval_interval": 0, "precision": "bf16",
                     "compile": compile_, "cuda_graphs": graphs},
        "logging": {"progress_bar": False}}, parse_overrides(overrides)))
    return pretrain(cfg)


def run_in_subprocess(backend: str, variant: str, overrides: list[str]) -> dict:
    """One run in a fresh process: a failed capture leaves the process's CUDA RNG and streams
    unusable, so one failure must not fail the runs after it."""
    command = [sys.executable, os.path.abspath(__file__), "--one", backend, variant, *overrides]
    done = subprocess.run(command, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    return {"error": (done.stdout + done.stderr)[-4000:]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="triton")
    parser.add_argument("--variants", default="cuda_graphs,compile,compile+cuda_graphs")
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--one", nargs=2, metavar=("BACKEND", "VARIANT"), help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if not torch.cuda.is_available():
        print("check_cuda_graphs.py needs a GPU", file=sys.stderr)
        return 2
    if args.one:
        try:
            result = train(*args.one, overrides)
        except Exception:
            traceback.print_exc()
            return 1
        print(RESULT + json.dumps({
            "losses": [result.train_losses[s] for s in sorted(result.train_losses)],
            "step_ms": result.step_seconds[max(result.step_seconds)] * 1e3}), flush=True)
        return 0
    failures = []
    for backend in args.backends.split(","):
        reference = None
        for variant in ["eager", *[v for v in args.variants.split(",") if v != "eager"]]:
            run = run_in_subprocess(backend, variant, overrides)
            if "error" in run:
                failures.append(f"{backend} {variant}:\n{run['error']}")
                print(f"{backend:>6} {variant:<20} FAILED", flush=True)
                continue
            losses = run["losses"]
            verdict = "reference"
            if variant == "eager":
                reference = losses
            elif reference is None:
                verdict = "no eager reference"
            else:
                worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
                verdict = f"max relative difference {worst:.2e}"
                if worst > args.rtol or len(losses) != len(reference):
                    failures.append(f"{backend} {variant}: losses {losses} vs eager {reference}")
                    verdict += " FAIL"
            print(f"{backend:>6} {variant:<20} losses {', '.join(f'{x:.5f}' for x in losses)} | "
                  f"last step {run['step_ms']:.1f} ms | {verdict}", flush=True)
    for failure in failures:
        print(f"\n{failure}", file=sys.stderr)
    print("PASS" if not failures else f"FAIL ({len(failures)})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
