"""TP = 2 against TP = 1 on GPUs: parity (logits, per-parameter norms, losses) and step time.

Two launches, the TP = 1 one first (``tools/bench/tp_parity_gpu.sh`` runs both):

    torchrun --standalone --nproc_per_node=1 tools/bench/tp_parity_gpu.py --tp 1 \
        --config examples/configs/transmamba_400m.yaml --out runs/tp_parity
    torchrun --standalone --nproc_per_node=2 tools/bench/tp_parity_gpu.py --tp 2 \
        --config examples/configs/transmamba_400m.yaml --out runs/tp_parity

Each launch builds the model exactly as the trainer does (``build_model_config``, megatron DDP,
the Megatron optimizer, ``forward_backward_func`` with finalize_model_grads; bf16 on GPU) from
the same seed: the initial model does not depend on the TP size, so no weights are copied. It
runs ``--steps`` optimizer steps at micro batch ``--micro-batch-size`` on fixed random tokens
and records: the logits of a fixed batch before training, every parameter's weight and
gradient norm at step 1 (norms of tensor-parallel parameters are summed over the TP ranks, so
they are layout-free and need no re-layout), the loss and grad norm of every step, the median
step time after ``--warmup`` steps and the peak memory. The TP = 1 launch writes
``<out>/tp1.pt``; the TP = 2 launch compares against it and prints a markdown report (also
``<out>/report.md``) with PASS / CHECK against the bf16 tolerances below. ``--section.key=value``
overrides the run config in both launches (e.g. ``--model.mixer_backend=triton``,
``--training.precision=fp32``); ``--sequence-parallel`` turns SP on for the TP = 2 launch. It
also runs on CPU (gloo, fp32) with a small config, which is how it was checked.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial

import torch
import torch.distributed as dist

from megatron_transmamba.data.tokenizer import build_tokenizer
from megatron_transmamba.models.language_model import TransMambaLanguageModel, count_parameters
from megatron_transmamba.parallel.initialize import destroy_distributed, initialize_distributed
from megatron_transmamba.training.config import load_run_config
from megatron_transmamba.training.pretrain import (build_model_config, build_optimizer,
                                                   lm_forward_step, pad_vocab_size,
                                                   resolve_bf16, wrap_model)

# bf16 tolerances: TP changes the order of bf16 reductions, so agreement is at bf16 rounding
# (~4e-3 relative per op), not bit-exact. fp32 runs agree to ~1e-5 (see docs/parallelism.md).
TOLERANCES = {"bf16": {"logits": 5e-2, "loss": 2e-2, "norm": 5e-2},
              "fp32": {"logits": 1e-4, "loss": 1e-4, "norm": 1e-4}}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layout_free_norms(model, tp_group, grads: bool) -> dict:
    """{name: L2 norm over the whole (unsharded) tensor} of weights or main_grads."""
    squares = {}
    for name, param in model.named_parameters():
        tensor = param.main_grad if grads else param
        square = tensor.detach().float().pow(2).sum()
        if getattr(param, "tensor_model_parallel", False):
            dist.all_reduce(square, group=tp_group)
        squares[name] = square.sqrt().item()
    return squares


def run(args, overrides) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg = load_run_config(args.config, [
        f"--parallel.tensor_model_parallel_size={args.tp}", "--checkpoint.save=null",
        f"--training.micro_batch_size={args.micro_batch_size}", "--training.global_batch_size=null",
        f"--training.train_iters={args.steps}", "--training.lr_warmup_iters=1", *overrides])
    t = cfg.training
    bf16 = resolve_bf16(t)
    model_config = build_model_config(cfg, bf16)
    info = initialize_distributed(tensor_model_parallel_size=args.tp, seed=t.seed)
    if info.data_parallel_size != 1:
        raise SystemExit(f"launch exactly {args.tp} processes for --tp {args.tp}")
    groups, device = info.process_groups, info.device
    vocab = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path).vocab_size
    padded = pad_vocab_size(vocab, t.make_vocab_size_divisible_by, args.tp)
    model = TransMambaLanguageModel(model_config, padded, pg_collection=groups).to(device)
    ddp_model = wrap_model(model, model_config, bf16)
    optimizer, scheduler = build_optimizer(ddp_model, t, bf16, model_config.params_dtype)
    forward_backward = partial(get_forward_backward_func(), pg_collection=groups)
    seq, batch = model_config.seq_length, args.micro_batch_size
    generator = torch.Generator().manual_seed(t.seed)

    def random_batch():
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=generator)
        return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                "loss_mask": torch.ones(batch, seq)}

    probe = random_batch()
    result = {"tp": args.tp, "sequence_parallel": model_config.sequence_parallel,
              "precision": "bf16" if bf16 else "fp32", "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "parameters": count_parameters(model, args.tp), "seq_length": seq,
              "micro_batch_size": batch, "config": args.config}
    result["weight_norms"] = layout_free_norms(model, groups.tp, grads=False)
    with torch.no_grad():
        logits = ddp_model(probe["tokens"].to(device)).float()            # [B, S, V/tp]
        shards = [torch.empty_like(logits) for _ in range(args.tp)]
        dist.all_gather(shards, logits.contiguous(), group=groups.tp)
        result["logits"] = torch.cat(shards, -1).cpu()

    losses, grad_norms, seconds = [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.steps):
        data = [random_batch()]
        _sync(device)
        start = time.perf_counter()
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        out = forward_backward(forward_step_func=partial(lm_forward_step, device=device),
                               data_iterator=iter(data), model=[ddp_model], num_microbatches=1,
                               seq_length=seq, micro_batch_size=batch, forward_only=False)
        if step == 0:
            result["grad_norms_step1"] = layout_free_norms(model, groups.tp, grads=True)
        _, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        _sync(device)
        seconds.append(time.perf_counter() - start)
        losses.append(out[0]["lm loss"].item())
        grad_norms.append(grad_norm)
    result.update(losses=losses, grad_norms=grad_norms, step_seconds=seconds,
                  median_step_s=statistics.median(seconds[args.warmup:]),
                  peak_memory_gib=(torch.cuda.max_memory_allocated(device) / 2**30
                                   if device.type == "cuda" else float("nan")))
    destroy_distributed()
    return result


def _relative(ref: float, out: float) -> float:
    return abs(out - ref) / max(abs(ref), 1e-12)


def report(ref: dict, run: dict) -> tuple[str, bool]:
    tol = TOLERANCES[run["precision"]]
    logits = (run["logits"] - ref["logits"]).abs().max().item() / ref["logits"].abs().max().item()
    loss = max(abs(a - b) for a, b in zip(run["losses"], ref["losses"]))
    weights = max(_relative(ref["weight_norms"][k], v) for k, v in run["weight_norms"].items())
    grads = {k: _relative(ref["grad_norms_step1"][k], v)
             for k, v in run["grad_norms_step1"].items()}
    worst = max(grads, key=grads.get)
    checks = [("initial weight norms (max rel. diff)", weights, 1e-5),
              ("logits before training (max abs diff / max abs)", logits, tol["logits"]),
              (f"step-1 grad norm per parameter (max rel. diff: {worst})", grads[worst],
               tol["norm"]),
              (f"losses of {len(run['losses'])} steps (max abs diff)", loss, tol["loss"])]
    ok = all(value <= limit for _, value, limit in checks)
    speed = ref["median_step_s"] / run["median_step_s"]
    lines = [
        f"## TP = 2 vs TP = 1: {run['config']} ({run['parameters'] / 1e6:.1f}M parameters)",
        "",
        f"{run['gpu']}, {run['precision']}, T = {run['seq_length']}, micro batch "
        f"{run['micro_batch_size']}, sequence parallel {run['sequence_parallel']}, median of "
        f"steps after the warmup.",
        "",
        "| check | value | tolerance | |",
        "|---|---|---|---|",
        *[f"| {name} | {value:.2e} | {limit:.0e} | {'PASS' if value <= limit else 'CHECK'} |"
          for name, value, limit in checks],
        "",
        "| layout | step (ms) | tokens/s | peak memory per rank (GiB) | last loss |",
        "|---|---|---|---|---|",
    ]
    tokens = run["seq_length"] * run["micro_batch_size"]
    for name, r in (("TP = 1", ref), ("TP = 2", run)):
        step = r["median_step_s"]
        lines.append(f"| {name} | {step * 1e3:.1f} | {tokens / step:,.0f} "
                     f"| {r['peak_memory_gib']:.1f} | {r['losses'][-1]:.4f} |")
    lines += ["", f"TP = 2 step speed-up over TP = 1: {speed:.2f}x "
              f"(parallel efficiency {speed / 2:.0%})", "",
              "losses TP=1: " + ", ".join(f"{x:.4f}" for x in ref["losses"]),
              "losses TP=2: " + ", ".join(f"{x:.4f}" for x in run["losses"])]
    return "\n".join(lines), ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="examples/configs/transmamba_400m.yaml")
    parser.add_argument("--tp", type=int, choices=(1, 2), required=True)
    parser.add_argument("--out", default="runs/tp_parity")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="turn on sequence parallelism for the --tp 2 launch")
    args, overrides = parser.parse_known_args(argv)
    if args.sequence_parallel and args.tp == 2:
        overrides.append("--parallel.sequence_parallel=true")
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")
    reference_path = os.path.join(args.out, "tp1.pt")
    if args.tp == 2 and not os.path.isfile(reference_path):
        parser.error(f"{reference_path} is missing: run the --tp 1 launch first")
    result = run(args, overrides)
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    os.makedirs(args.out, exist_ok=True)
    torch.save(result, os.path.join(args.out, f"tp{args.tp}.pt"))
    if args.tp == 1:
        print(f"TP = 1: median step {result['median_step_s'] * 1e3:.1f} ms, losses "
              f"{[round(x, 4) for x in result['losses']]}; saved {reference_path}")
        return 0
    text, ok = report(torch.load(reference_path, weights_only=False), result)
    print(text)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
