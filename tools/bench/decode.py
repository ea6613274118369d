"""Per-token decode latency and cache memory at long contexts: TransMamba, Mamba-2, Transformer.

    python tools/bench/decode.py [--json PATH] [--device cpu|cuda] [--contexts 8192,32768,131072]

Three small models of one shape (hidden 256, four mixer + four MLP layers, H = G = 4,
P = N = 64, so a ``*`` layer's KV cache has the shape of a ``T`` layer's attention prefix):
TransMamba ``T-T-T-T-`` with TransPoints 1024, 2048, 4096 and 8192 (every layer past its
TransPoint at these contexts), Mamba-2 ``M-M-M-M-`` and a Transformer ``*-*-*-*-``. For each
context c the model's ``step`` (models/language_model.py, the decode path generation runs) is
timed on one token at position c (median over ``--steps`` after ``--warmup``; the contexts take
turns token by token, so a shared machine's load changes reach all of them alike), and the
cache bytes are those of ``HybridCache.nbytes()`` (allocated buffers).

Reaching a context of 128k by prefill would take most of the run on a CPU, so the cache is
built directly: ``allocate_inference_cache(1, c + steps)`` and then, per layer, what a prefill
of c tokens leaves there, with random values: a ``T`` layer past its TransPoint and an ``M``
layer hold a conv state and an SSM state (the prefix buffers released), a ``*`` layer holds c
rotated keys and values; ``length`` = c. A step's cost and the cache's size depend only on these
shapes, not on the values. At the first context the tool also prefills a real prompt of that
length once per model and checks that its cache has the same size (``prefill_check``).
TransMamba and Mamba-2 must come out flat in context (128k / 8k ratio <= 1.1); the
Transformer's step and cache grow linearly.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="(Transformer Engine|Apex).* not installed")

import torch  # noqa: E402

from megatron_transmamba.config import TransMambaConfig  # noqa: E402
from megatron_transmamba.models.language_model import TransMambaLanguageModel  # noqa: E402
from transmamba_kernels.reference.cache import AttentionCache, MixerCache  # noqa: E402

SHAPE = dict(hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, kv_channels=64,
             mamba_num_heads=4, mamba_num_groups=4, mamba_head_dim=64, mamba_state_dim=64,
             ssd_chunk_size=64, seq_length=8192, use_cpu_initialization=True)
MODELS = {
    "transmamba": dict(layer_pattern="T-T-T-T-", transpoint_schedule="list",
                       transpoint_values=[1024, 2048, 4096, 8192]),
    "mamba2": dict(layer_pattern="M-M-M-M-", transpoint_schedule="mamba"),
    "transformer": dict(layer_pattern="*-*-*-*-", transpoint_schedule="mamba"),
}
VOCAB = 512
FLAT_LIMIT = 1.1


def build(name: str, device: str) -> TransMambaLanguageModel:
    torch.manual_seed(0)
    config = TransMambaConfig(**SHAPE, **MODELS[name], params_dtype=torch.float32)
    return TransMambaLanguageModel(config, VOCAB).to(device).eval()


def synthetic_cache(model, context: int, capacity: int):
    """The cache a prefill of ``context`` tokens leaves, with random values (module docstring)."""
    cache = model.allocate_inference_cache(1, capacity)
    gen = torch.Generator().manual_seed(context)
    fill = lambda t: t.copy_(torch.randn(t.shape, generator=gen).to(t) * 0.1)  # noqa: E731
    for index, layer in enumerate(cache.layers):
        if isinstance(layer, MixerCache):
            transpoint = model.layers[index].transpoint
            fill(layer.conv_state)
            if context >= transpoint:
                fill(layer.ssm_state)
                layer.release_prefix()
            else:
                for buffer in (layer.keys, layer.values, layer.dts):
                    fill(buffer[:, :context])
                layer.dts.abs_()
            layer.length = context
        elif isinstance(layer, AttentionCache):
            fill(layer.keys[:, :context])
            fill(layer.values[:, :context])
            layer.length = context
    cache.seen_tokens = context
    return cache


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_steps(model, caches: list, steps: int, warmup: int, device: str) -> list[float]:
    """Median milliseconds of one ``model.step`` on each cache over ``steps`` tokens after
    ``warmup``. The caches take turns, one token each, so a change in the machine's load
    reaches every context alike."""
    tokens = [torch.zeros(1, 1, dtype=torch.long, device=device) for _ in caches]
    times = [[] for _ in caches]
    for i in range(warmup + steps):
        for j, cache in enumerate(caches):
            _sync(device)
            start = time.perf_counter()
            logits = model.step(tokens[j], cache)
            _sync(device)
            if i >= warmup:
                times[j].append((time.perf_counter() - start) * 1e3)
            tokens[j] = logits[:, -1].argmax(-1, keepdim=True)
    return [statistics.median(t) for t in times]


@torch.no_grad()
def prefill_cache_bytes(model, context: int, capacity: int, device: str) -> int:
    cache = model.allocate_inference_cache(1, capacity)
    prompt = torch.randint(0, VOCAB, (1, context), generator=torch.Generator().manual_seed(1))
    model.prefill(prompt.to(device), cache)
    return cache.nbytes()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} CPUs (shared with other jobs)"


def _git() -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    run = lambda *args: subprocess.run(["git", *args], cwd=here, capture_output=True,  # noqa: E731
                                       text=True).stdout.strip()
    return {"commit": run("rev-parse", "HEAD") or None,
            "dirty_files": len(run("status", "--porcelain", "--untracked-files=no").splitlines())}


def table(record: dict) -> str:
    contexts = record["contexts"]
    lines = ["| model | " + " | ".join(f"{c // 1024}k ms/token" for c in contexts)
             + " | " + " | ".join(f"{c // 1024}k cache MiB" for c in contexts)
             + f" | ratio {contexts[-1] // 1024}k/{contexts[0] // 1024}k (time, cache) |",
             "|---" * (2 + 2 * len(contexts)) + "|"]
    for name, rows in record["models"].items():
        per = {r["context"]: r for r in rows["records"]}
        ratio = rows["ratio_last_to_first"]
        lines.append(f"| {name} | " + " | ".join(f"{per[c]['ms_per_token']:.2f}" for c in contexts)
                     + " | " + " | ".join(f"{per[c]['cache_bytes'] / 2 ** 20:.2f}" for c in contexts)
                     + f" | {ratio['ms_per_token']:.2f}, {ratio['cache_bytes']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the record here")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--contexts", default="8192,32768,131072")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-prefill-check", action="store_true",
                        help="skip the real prefill at the first context")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = sorted(int(c) for c in args.contexts.split(",") if c)
    names = [n for n in args.models.split(",") if n]
    from megatron_transmamba.hf.export import ensure_single_process_group

    ensure_single_process_group()
    started = time.time()
    record = {
        "what": "per-token decode latency (model.step, median) and cache bytes at each context; "
                "cache built directly at the context with random values (tools/bench/decode.py "
                "docstring), checked against a real prefill at the first context",
        "machine": _cpu_name() if args.device == "cpu" else torch.cuda.get_device_name(),
        "device": args.device, "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": _git(),
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0],
                     "megatron-core": __import__("megatron.core").core.__version__},
        "command": " ".join(shlex.quote(a) for a in ["tools/bench/decode.py",
                                                     *(sys.argv[1:] if argv is None else argv)]),
        "shape": {k: v for k, v in SHAPE.items() if k != "use_cpu_initialization"},
        "steps": args.steps, "warmup": args.warmup, "contexts": contexts, "models": {},
    }
    for name in names:
        model = build(name, args.device)
        capacity = lambda context: context + args.warmup + args.steps + 1  # noqa: E731
        caches = [synthetic_cache(model, c, capacity(c)) for c in contexts]
        rows = [{"context": c, "cache_bytes": cache.nbytes()} for c, cache in zip(contexts, caches)]
        times = time_steps(model, caches, args.steps, args.warmup, args.device)
        del caches
        for row, ms in zip(rows, times):
            row["ms_per_token"] = ms
            print(f"{name:12s} context {row['context']:>7d}: {ms:8.2f} ms/token, "
                  f"cache {row['cache_bytes'] / 2 ** 20:9.2f} MiB", flush=True)
        if not args.no_prefill_check:
            row = rows[0]
            row["prefill_check_cache_bytes"] = prefill_cache_bytes(
                model, contexts[0], capacity(contexts[0]), args.device)
            if row["prefill_check_cache_bytes"] != row["cache_bytes"]:
                raise AssertionError(f"{name}: the synthetic cache at {contexts[0]} has "
                                     f"{row['cache_bytes']} bytes, a real prefill's "
                                     f"{row['prefill_check_cache_bytes']}")
        first, last = rows[0], rows[-1]
        record["models"][name] = {
            **MODELS[name], "records": rows,
            "ratio_last_to_first": {key: last[key] / first[key]
                                    for key in ("ms_per_token", "cache_bytes")}}
        del model
    record["seconds"] = round(time.time() - started, 1)
    flat = {n: r["ratio_last_to_first"] for n, r in record["models"].items() if n != "transformer"}
    record["flat_in_context"] = all(max(r.values()) <= FLAT_LIMIT for r in flat.values())
    print()
    print(table(record))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"\nwrote {args.json}")
    if not record["flat_in_context"]:
        print(f"not flat: {flat} (limit {FLAT_LIMIT})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
