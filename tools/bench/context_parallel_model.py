"""Context-parallel communication and memory, modelled from the configs (no GPU, nothing measured).

    python tools/bench/context_parallel_model.py [--configs a.yaml,b.yaml] \
        [--seq-lengths 8192,16384,32768,65536,131072] [--cp-sizes 1,2,4,8] [--gbps 400] [--json]
    python tools/bench/context_parallel_model.py --check docs/results/h200_400m_8k.json ...

For every config, T and CP: the forward bytes one rank receives per sequence-mixing layer
(mean over the model's T / M / * layers and over ranks) under (a) state passing, ours, planned,
and (b) a Ulysses-style head all-to-all; the ratio a / b; and the time those bytes would take at
``--gbps`` GB/s (an ASSUMED link bandwidth, NVLink-class by default, not a measurement). Then
the largest power-of-two T (4k..1M) whose estimated training memory per rank (micro-batch 1,
bf16, no recomputation) fits in an H200's 141e9 bytes less a 10% reserve. Every assumption is
in megatron_transmamba/parallel/cp_cost.py's docstring.

``--check`` compares the memory estimate (at CP = 1) with the peak memory measured by
``tools/bench/model_throughput.py`` records at micro-batch 1: one row per record, estimate and
measured GiB and their ratio. CUDA-graph runs keep the memory pools of earlier runs of the same
process, so their peaks are upper bounds unless the run was alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

DEFAULT_CONFIGS = ("examples/configs/transmamba_400m.yaml", "examples/configs/transmamba_1p5b.yaml",
                   "examples/configs/transformer_400m.yaml", "examples/configs/mamba2_400m.yaml")
DEFAULT_LENGTHS = (8192, 16384, 32768, 65536, 131072)
DEFAULT_CP = (1, 2, 4, 8)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def load(path: str):
    """(model config, padded vocabulary size) of a YAML run config."""
    from megatron_transmamba.scaling.plan import _model_config, _vocab_size
    from megatron_transmamba.training.config import load_run_config
    run = load_run_config(path)
    return _model_config(run), _vocab_size(run)


def model(paths, lengths, cp_sizes, gbps: float) -> dict:
    from megatron_transmamba.parallel import cp_cost
    rows, fits = [], []
    for path in paths:
        config, vocab = load(path)
        name = os.path.splitext(os.path.basename(path))[0]
        for t in lengths:
            for cp in cp_sizes:
                c = cp_cost.communication(config, t, cp)
                a, b = c["state_passing_per_layer"], c["all_to_all_per_layer"]
                mem = cp_cost.memory_per_rank(config, vocab, t, cp)
                rows.append({"config": name, "T": t, "cp": cp, **c,
                             "ratio": a / b if b else None,
                             "state_passing_us_per_layer": a / (gbps * 1e9) * 1e6,
                             "all_to_all_us_per_layer": b / (gbps * 1e9) * 1e6,
                             "memory_per_rank": mem})
        fits.append({"config": name, **{f"cp{cp}": cp_cost.max_seq_length(config, vocab, cp)
                                        for cp in cp_sizes}})
    return {"assumptions": {"gbps": gbps, "bandwidth_is_assumed": True,
                            "bytes": "forward, received per rank, mean over ranks and mixing layers; "
                                     "backward moves the same bytes again",
                            "memory_capacity_bytes": cp_cost.H200_BYTES,
                            "memory_reserve": cp_cost.MEMORY_RESERVE,
                            "memory": "micro-batch 1, bf16, no recomputation, no optimizer sharding"},
            "rows": rows, "max_seq_length": fits}


def check(records_paths) -> str:
    """Markdown: the CP = 1 memory estimate against measured peaks (micro-batch 1 records)."""
    from megatron_transmamba.parallel import cp_cost
    lines = ["| config | T | variant | estimate GiB | measured peak GiB | measured / estimate |",
             "|---|---|---|---|---|---|"]
    for records_path in records_paths:
        with open(records_path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("records"), list) or any(
                "peak_gib" not in r for r in data["records"]):
            raise SystemExit(f"{records_path}: not a tools/bench/model_throughput.py record "
                             "(expected a 'records' list with 'peak_gib')")
        records = data["records"]
        for r in records:
            if r["status"] != "ok" or r["micro_batch"] != 1 or r.get("peak_gib") is None:
                continue
            config, vocab = load(r["config"])
            estimate = cp_cost.memory_per_rank(cp_cost.at_length(config, r["T"]), vocab, r["T"],
                                               1)["total"] / 2 ** 30
            lines.append(f"| {os.path.splitext(os.path.basename(r['config']))[0]} | {r['T']} | "
                         f"{r['variant']} | {estimate:.1f} | {r['peak_gib']:.1f} | "
                         f"{r['peak_gib'] / estimate:.2f} |")
    return "\n".join(lines)


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:.3f}"


def markdown(result: dict, cp_sizes) -> str:
    gbps = result["assumptions"]["gbps"]
    lines = [f"Forward bytes received per rank per sequence-mixing layer (MiB; mean over ranks and "
             f"layers). Times at an ASSUMED {gbps:g} GB/s.", "",
             "| config | T | CP | state passing MiB | all-to-all MiB | ratio | state passing us | all-to-all us |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = f"{r['ratio']:.4f}" if r["ratio"] is not None else "-"
        lines.append(f"| {r['config']} | {r['T']} | {r['cp']} | {_mib(r['state_passing_per_layer'])} | "
                     f"{_mib(r['all_to_all_per_layer'])} | {ratio} | {r['state_passing_us_per_layer']:.1f} | "
                     f"{r['all_to_all_us_per_layer']:.1f} |")
    lines += ["", "Largest T (power of two, 4k..1M) whose estimated memory per rank fits in 141e9 B "
              "less 10% (micro-batch 1, bf16, no recomputation):", "",
              "| config | " + " | ".join(f"CP={cp}" for cp in cp_sizes) + " |",
              "|---|" + "---|" * len(cp_sizes)]
    for f in result["max_seq_length"]:
        lines.append(f"| {f['config']} | " + " | ".join(str(f[f'cp{cp}'] or "none") for cp in cp_sizes) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    parser.add_argument("--seq-lengths", default=",".join(map(str, DEFAULT_LENGTHS)))
    parser.add_argument("--cp-sizes", default=",".join(map(str, DEFAULT_CP)))
    parser.add_argument("--gbps", type=float, default=400.0,
                        help="ASSUMED link bandwidth in GB/s for the optional time columns")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--check", nargs="+", metavar="RECORDS",
                        help="model_throughput.py JSON records: estimate against measured peaks")
    args = parser.parse_args(argv)
    if args.check:
        print(check(args.check))
        return 0
    paths = [p for p in args.configs.split(",") if p.strip()]
    cp_sizes = _ints(args.cp_sizes)
    result = model(paths, _ints(args.seq_lengths), cp_sizes, args.gbps)
    print(json.dumps(result) if args.json else markdown(result, cp_sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
