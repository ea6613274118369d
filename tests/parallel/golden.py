"""The one-process runs that the layout-parity tests compare every layout with, and their golden
loss files ``tests/data/golden/<case>.json`` (as torchtitan keeps ``tests/assets/losses``).

A layout-parity test only sees a regression that moves one layout away from the others; a
change that moves every layout alike (the model's math, the optimizer, the data pipeline)
passes it. ``test_golden_losses.py`` catches that one: each one-process run must repeat its
golden losses and gradient norms. After an intended change, regenerate the files with
``python -m tests.tools.regenerate_golden`` and say in the commit why the losses moved.

The runs read a fixed corpus of seeded documents (``data_parallel_common.fixed_corpus``), not the
embedded one: that is the interpreter's standard library, so its bytes, and the losses, change
with the Python installed.

Tolerance, relative, per step, for losses and gradient norms alike: 1e-5. Measured on these
runs, against the files (written at 2 threads, AVX512): 1, 2 and 4 threads, ATen's kernels at
AVX512, AVX2 and without vector extensions (``ATEN_CPU_CAPABILITY``), MKL's at AVX512, AVX2 and
SSE4.2 (``MKL_ENABLE_INSTRUCTIONS``) and the extreme combinations move them by at most 1.5e-7
(about one float32 rounding); 1e-5 leaves 70x that for other CPUs, yet fails a learning rate
changed by 0.1% (losses 4e-5 .. 2e-4, gradient norms 8e-5 .. 4e-4 away).
"""

import json
import platform
from pathlib import Path

import data_parallel_common as dp
import context_parallel_common as cp

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "data" / "golden"
COMMAND = "python -m tests.tools.regenerate_golden"
RTOL = 1e-5


def packed_corpus(out_dir: Path) -> str:
    """Documents of 1 to 40 bytes: a 32-token sample holds several, and many cross token 16
    (the context-parallel shard boundary); built once at ``out_dir``/short."""
    from helpers import short_documents_corpus

    prefix = Path(out_dir) / "short"
    if not prefix.with_suffix(".idx").exists():
        short_documents_corpus(str(prefix), "abc \n", 40, 500)
    return str(prefix)


CASES = {
    # the parity runs of test_data_parallel.py and test_pipeline_parallel.py: 5 steps
    "data_parallel": lambda out: dp.run_config(out),
    # test_tied_embeddings_parallel.py: the same with a tied embedding and LM head
    "data_parallel_tied": lambda out: dp.run_config(out, model=dp.TIED),
    # test_context_parallel_training.py: 20 steps, TransPoints around the CP shard boundaries
    "context_parallel": lambda out: cp.run_config(out),
    # test_context_parallel_training.py: packed documents (data.reset_at_eod), 5 steps
    "context_parallel_packed": lambda out: cp.packed_run_config(out, packed_corpus(out)),
}


def one_process_run(case: str, out_dir: Path) -> dict:
    """Train ``case`` in this process: losses and gradient norms of every step, the parameter
    count, the run config (portable) and the layout."""
    from megatron_transmamba.training.pretrain import pretrain

    cfg = CASES[case](out_dir)
    result = pretrain(cfg)
    assert result.layout["world_size"] == 1
    steps = range(1, cfg.training.train_iters + 1)
    return {"losses": [result.train_losses[s] for s in steps],
            "grad_norms": [result.grad_norms[s] for s in steps],
            "parameters": result.num_parameters,
            "config": portable_config(cfg, out_dir), "layout": result.layout}


def portable_config(cfg, out_dir: Path) -> dict:
    """``cfg`` as a dict with ``out_dir`` written as ``<out>`` (the same on every machine)."""
    text = json.dumps(cfg.to_dict(), sort_keys=True).replace(str(out_dir), "<out>")
    return json.loads(text)


def path(case: str) -> Path:
    return GOLDEN_DIR / f"{case}.json"


def write(case: str, run: dict) -> Path:
    import megatron.core
    import torch

    record = {
        "case": case,
        "command": f"{COMMAND} {case}",
        "losses": run["losses"],
        "grad_norms": run["grad_norms"],
        "parameters": run["parameters"],
        "config": run["config"],
        "versions": {"torch": torch.__version__, "megatron_core": megatron.core.__version__,
                     "python": platform.python_version()},
        "machine": {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "threads": torch.get_num_threads(), "processor": platform.processor()
                    or platform.machine()},
    }
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    path(case).write_text(json.dumps(record, indent=1) + "\n")
    return path(case)


def differences(case: str, run: dict) -> list:
    """What in ``run`` disagrees with the golden file of ``case`` (empty: it matches). Options
    added to or removed from the run config since the file was written are not differences."""
    golden = json.loads(path(case).read_text())
    problems = []
    ours, theirs = _flat(run["config"]), _flat(golden["config"])
    changed = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
    if changed:
        problems.append("the run config differs: " + ", ".join(
            f"{k} = {ours[k]!r} (golden {theirs[k]!r})" for k in changed))
    if run["parameters"] != golden["parameters"]:
        problems.append(f"{run['parameters']} parameters, golden {golden['parameters']}")
    for key in ("losses", "grad_norms"):
        got, want = run[key], golden[key]
        if len(got) != len(want):
            problems.append(f"{len(got)} {key}, golden {len(want)}")
            continue
        errors = [abs(g - w) / abs(w) for g, w in zip(got, want)]
        step = max(range(len(errors)), key=errors.__getitem__)
        if not errors[step] <= RTOL:
            problems.append(f"{key}: step {step + 1} {got[step]:.7g}, golden {want[step]:.7g} "
                            f"(relative {errors[step]:.1e} > {RTOL:.0e})")
    return problems


def _flat(config: dict) -> dict:
    return {f"{section}.{key}": value for section, values in config.items()
            for key, value in values.items()}
