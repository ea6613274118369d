"""Our SSD and mixer core against mamba_ssm's Triton SSD (and SDPA) in one process, on a GPU.

    PYTHONPATH=<mamba_ssm source>:$PYTHONPATH python tools/bench/compare_mamba_ssm.py \
        [--json docs/results/<name>.json] [--quick] [--training-chunks 64,256] [--long-chunks 64,256]

mamba_ssm's Triton ops import from its source distribution without its CUDA extensions: put
the sdist's ``mamba_ssm/ops/triton`` and ``mamba_ssm/utils`` under a folder with an
``mamba_ssm/__init__.py`` that imports nothing (``einops`` is needed). Times are medians of
``triton.testing.do_bench`` in bf16, eager (host launch cost included) and replayed as a CUDA
graph (``do_bench_cudagraph``: device time); every row gives our time, theirs and the ratios
(ours / theirs, lower is better), and the relative error of our output against theirs
(float32 reference: theirs in float32 inputs). ``--quick``: no 64k-token SSD rows. Each of
mamba_ssm's chunk sizes costs its autotuning (minutes per shape): ``--training-chunks`` and
``--long-chunks`` choose theirs at the two shapes (ours is always 64).

- **SSD**: ``chunk_ssd_triton`` against ``mamba_chunk_scan_combined`` with the same inputs (raw
  dt with dt_bias and softplus inside, D skip), forward and forward+backward, at the training
  shape (B = 1, T = 8192, H = G = 16, P = N = 96) and at 64k tokens (B = 8, T = 8192,
  H = G = 16, P = N = 128); chunk 64 for both, and mamba_ssm also at its default 256.
- **Mixer core**: ``mixer_core_triton`` (prefix attention, Memory Converter, SSD from p) against
  the composition a user would write from the libraries: RoPE + SDPA (cuDNN where PyTorch
  offers it) on the prefix and ``mamba_chunk_scan_combined`` over the whole sequence (the SSM
  state at p is the Memory Converter's), at p = 0, T/4, T/2 and T, training shape.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from functools import partial

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from megatron_transmamba.layers.mixer_core import grouped_attention, mixer_core_triton  # noqa: E402
from megatron_transmamba.layers.rotary import apply_rope, rope_table  # noqa: E402
from transmamba_kernels.ssd.chunk import chunk_ssd_triton  # noqa: E402


def bench(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def bench_graph(fn):
    """Device time: the call replayed as a CUDA graph (no host launch cost); None when the call
    cannot be captured."""
    import triton.testing
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    except Exception as error:                      # e.g. a host read inside the call
        print(f"# not capturable: {type(error).__name__}: {str(error)[:120]}", flush=True)
        torch.cuda.synchronize()
        return None


def timings(ours, theirs) -> dict:
    """{what: ms} for our and their (forward, forward+backward) callables: eager (host launch
    cost included) and CUDA-graph replay (device only)."""
    out = {}
    for what, (o, t) in (("forward", (ours[0], theirs[0])),
                         ("forward_backward", (ours[1], theirs[1]))):
        row = {"ours_ms": bench(o), "theirs_ms": bench(t)}
        row["ratio"] = row["ours_ms"] / row["theirs_ms"]
        row["ours_graph_ms"], row["theirs_graph_ms"] = bench_graph(o), bench_graph(t)
        if row["ours_graph_ms"] and row["theirs_graph_ms"]:
            row["ratio_graph"] = row["ours_graph_ms"] / row["theirs_graph_ms"]
        out[what] = row
    return out


def rel(ref, out) -> float:
    ref, out = ref.double(), out.double()
    return ((ref - out).norm() / ref.norm().clamp_min(1e-30)).item()


def inputs(batch, T, H, G, P, N, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = partial(torch.randn, generator=g, device="cuda")
    x = r(batch, T, H, P).to(dtype)
    dt = (r(batch, T, H) - 2.0).to(dtype)             # raw: softplus(dt + bias) ~ 0.1
    B, C = (r(batch, T, G, N) / math.sqrt(N)).to(dtype), (r(batch, T, G, N) / math.sqrt(N)).to(dtype)
    A_log = torch.log(torch.linspace(1.0, 16.0, H, device="cuda"))
    dt_bias = torch.zeros(H, device="cuda")
    D = torch.ones(H, device="cuda")
    return x, dt, A_log, B, C, D, dt_bias


def fwd_bwd(fn, leaves, grad_seed=1):
    """(forward-only callable, forward+backward callable)."""
    out = fn()
    outs = out if isinstance(out, tuple) else (out,)
    # outputs off the graph (None, or the mixer core's all-zero SSD rows at p = T) get none
    grads = [torch.randn_like(o) if o is not None and o.requires_grad else None for o in outs]

    def both():
        res = fn()
        res = res if isinstance(res, tuple) else (res,)
        pairs = [(o, g) for o, g in zip(res, grads) if g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        for leaf in leaves:
            leaf.grad = None

    def forward():
        with torch.no_grad():
            fn()

    return forward, both


def ssd_rows(mamba, shape_name, batch, T, H, G, P, N, chunks):
    rows = []
    dtype = torch.bfloat16
    x, dt, A_log, B, C, D, dt_bias = inputs(batch, T, H, G, P, N, dtype)
    A = -torch.exp(A_log)
    leaves = [t.requires_grad_(True) for t in (x, dt, B, C)]
    ours_fn = lambda: chunk_ssd_triton(x, dt, A, B, C, 64, D=D, dt_bias=dt_bias, dt_softplus=True)
    # accuracy: both against mamba_ssm in float32 inputs
    with torch.no_grad():
        ref = mamba(x.float(), dt.float(), A, B.float(), C.float(), 64, D=D, dt_bias=dt_bias,
                    dt_softplus=True)
        err_ours = rel(ref, ours_fn())
        err_theirs = rel(ref, mamba(x, dt, A, B, C, 64, D=D, dt_bias=dt_bias, dt_softplus=True))
    ours = fwd_bwd(ours_fn, leaves)
    for chunk in chunks:
        theirs_fn = lambda: mamba(x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True)
        for what, row in timings(ours, fwd_bwd(theirs_fn, leaves)).items():
            rows.append({"kernel": "ssd", "shape": shape_name, "what": what,
                         "dims": dict(B=batch, T=T, H=H, G=G, P=P, N=N),
                         "ours_chunk": 64, "theirs_chunk": chunk, **row,
                         "rel_err_ours_bf16": err_ours, "rel_err_theirs_bf16": err_theirs})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def composed_core(mamba, x, dt, dt_bias, A_log, B, C, D, p, chunk, scale, rope, backend):
    """RoPE + SDPA on [0, p), mamba_ssm's SSD over [0, T) (its rows >= p): the libraries."""
    T = x.shape[1]
    parts = []
    if p > 0:
        with backend():
            parts.append(grouped_attention(apply_rope(C[:, :p], rope),
                                           apply_rope(B[:, :p], rope), x[:, :p], scale))
    if p < T:
        y = mamba(x, dt, -torch.exp(A_log), B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True)
        parts.append(y[:, p:])
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def core_rows(mamba, batch, T, H, G, P, N):
    rows = []
    x, dt, A_log, B, C, D, dt_bias = inputs(batch, T, H, G, P, N, torch.bfloat16)
    leaves = [t.requires_grad_(True) for t in (x, dt, B, C)]
    scale = 1.0 / math.sqrt(N)
    rope = rope_table(T, N, 10000.0, x.device)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = partial(sdpa_kernel, [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION])
    except ImportError:
        backend = nullcontext
    for p in (0, T // 4, T // 2, T):
        ours_fn = lambda: mixer_core_triton(x, dt, dt_bias, A_log, B, C, D, p, 64, scale, rope)
        theirs_fn = lambda: composed_core(mamba, x, dt, dt_bias, A_log, B, C, D, p, 64, scale,
                                          rope, backend)
        with torch.no_grad():
            y, prefix = ours_fn()
            ours_out = y.clone()
            if prefix is not None:       # [B, p, G, H/G*P] -> the spliced [B, T, H, P]
                ours_out[:, :p] = prefix.reshape(batch, p, H, P)
            err = rel(theirs_fn().float(), ours_out.float())
        for what, row in timings(fwd_bwd(ours_fn, leaves), fwd_bwd(theirs_fn, leaves)).items():
            rows.append({"kernel": "mixer_core", "shape": "training", "what": what,
                         "transpoint": p, "dims": dict(B=batch, T=T, H=H, G=G, P=P, N=N),
                         **row, "rel_diff_bf16": err})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--quick", action="store_true", help="training shape only")
    parser.add_argument("--training-chunks", default="64,256",
                        help="mamba_ssm's chunk sizes at the training shape")
    parser.add_argument("--long-chunks", default="64,256",
                        help="mamba_ssm's chunk sizes at 64k tokens")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("compare_mamba_ssm: needs a GPU", file=sys.stderr)
        return 2
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as mamba
        import mamba_ssm
    except ImportError as error:
        print(f"compare_mamba_ssm: mamba_ssm's Triton ops do not import ({error}); see the "
              "module docstring", file=sys.stderr)
        return 2
    import triton
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:
        commit = None
    start = time.time()
    rows = []

    def save() -> None:
        """The record so far: a call stopped by its time limit keeps the finished rows."""
        if not args.json:
            return
        record = {"command": " ".join(sys.argv),
                  "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "git": commit,
                  "machine": torch.cuda.get_device_name(), "host": platform.node(),
                  "versions": {"torch": torch.__version__, "triton": triton.__version__,
                               "mamba_ssm": getattr(mamba_ssm, "__version__", None)},
                  "seconds": time.time() - start, "rows": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)

    chunks = lambda text: tuple(int(c) for c in text.split(",") if c)
    rows += ssd_rows(mamba, "training", 1, 8192, 16, 16, 96, 96, chunks(args.training_chunks))
    save()
    rows += core_rows(mamba, 1, 8192, 16, 16, 96, 96)
    save()
    if not args.quick:
        rows += ssd_rows(mamba, "64k_tokens", 8, 8192, 16, 16, 128, 128, chunks(args.long_chunks))
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
