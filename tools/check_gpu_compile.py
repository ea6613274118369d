"""Compile every Triton kernel of the package for a GPU target, on a machine without a GPU.

Run before a GPU session, with the Triton version the GPU machine has, so a kernel that does
not compile there costs no GPU time:

    python tools/check_gpu_compile.py [--arch 90] [--filter ssd,conv,norm,swiglu,optimizer]

The kernel wrappers run on small CPU tensors with kernel launches intercepted: nothing is
launched (outputs stay unwritten). Each launch's argument types, specialisations and
constexprs, under every config the GPU autotuner would try for that shape, are compiled to a
cubin with ``triton.compile`` for the target (sm_90 = H100/H200). Prints one line per distinct
compilation and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)   # the GPU code paths, with the autotuners' configs

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import autotuner as autotuner_module  # noqa: E402
from triton.runtime import jit as jit_module  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Recorder:
    """Stands in for kernel launches: collects one ASTSource and options per distinct compile."""

    def __init__(self, target: GPUTarget):
        self.target = target
        self.backend = make_backend(target)
        self.jobs: dict[str, tuple] = {}
        self.context = ""

    def jit_run(self, fn, *args, grid=None, warmup=False, **kwargs):
        kwargs.setdefault("debug", False)
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
        binder = jit_module.create_function_from_signature(fn.signature, fn.params, self.backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound_args,
                                                              specialization, options)
        key = f"{fn.__name__} {signature} {constexprs} {attrs} {options.num_warps} {options.num_stages}"
        if key not in self.jobs:
            label = (f"{fn.__name__} warps={options.num_warps} stages={options.num_stages} "
                     f"{ {fn.arg_names[k[0]]: v for k, v in constexprs.items() if len(k) == 1} }")
            self.jobs[key] = (label, self.context, ASTSource(fn, signature, constexprs, attrs),
                              options.__dict__)

    def autotune_run(self, tuner, *args, **kwargs):
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        tuner.nargs = dict(zip(tuner.arg_names, args))
        configs = tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs
        for config in configs:
            self.jit_run(tuner.fn, *args, **kwargs, **config.all_kwargs())
        tuner.nargs = None


def drive_kernels(recorder: Recorder, only: str) -> None:
    """Calls the wrappers in the variants the model uses: bf16 training, fp32 (exact), packed."""
    sys.path.insert(0, ROOT)
    from kernels.conv.causal_conv import causal_conv1d_silu_triton
    from kernels.norm.gated_rmsnorm import gated_rmsnorm_triton
    from kernels.norm.rmsnorm import add_rmsnorm_triton, rmsnorm_triton
    from kernels.swiglu.swiglu import swiglu_triton
    from kernels.ssd.chunk import chunk_ssd_triton, ssd_backward, ssd_forward

    def grad(out, *leaves):
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out.float().sum(), leaves, allow_unused=True)

    batch, T, H, P, G, N = 1, 200, 4, 96, 4, 96
    for dtype in (torch.bfloat16, torch.float32):
        leaf = lambda *s: torch.randn(*s).to(dtype).requires_grad_(True)
        if "ssd" in only:
            for packed in (False, True):
                recorder.context = f"ssd {dtype} packed={packed}"
                x, B, C = leaf(batch, T, H, P), leaf(batch, T, G, N), leaf(batch, T, G, N)
                dt = torch.rand(batch, T, H, requires_grad=True)
                A = -torch.rand(H)
                extra = {}
                if packed:
                    extra["cu_seqlens"] = torch.tensor([0, 70, T])
                    extra["initial_states"] = torch.randn(2, H, P, N, requires_grad=True)
                y, final = chunk_ssd_triton(x, dt, A, B, C, 64, D=torch.ones(H), transpoint=30,
                                            return_final_states=True, **extra)
                torch.autograd.grad(y.float().sum() + final.sum(), (x, dt, B, C))
            recorder.context = f"ssd mixer {dtype}"       # raw dt, A_log, dt_limit, prefix grads
            x, dt = leaf(batch, T, H, P), leaf(batch, T, H)       # G = 2 < H: the group sum
            B, C = leaf(batch, T, 2, N), leaf(batch, T, 2, N)
            params = [torch.randn(H, requires_grad=True) for _ in range(3)]
            y, saved = ssd_forward(x, dt, *params[:2], B, C, params[2], 64, 30, dt_limit=(0.001, 10.0))
            ssd_backward(torch.ones_like(y), x, dt, *params[:2], B, C, params[2], saved, 64, 30,
                         dt_limit=(0.001, 10.0), prefix_dx=x[:, :30], prefix_dB=B[:, :30],
                         prefix_dC=C[:, :30])
        if "conv" in only:
            for seq in (None, torch.zeros(batch, T, dtype=torch.int32)):
                recorder.context = f"conv {dtype} seq_idx={seq is not None}"
                xc, w, b = leaf(batch, T, 3 * 128), leaf(3 * 128, 1, 4), leaf(3 * 128)
                grad(causal_conv1d_silu_triton(xc, w, b, seq_idx=seq), xc, w, b)
            recorder.context = f"conv {dtype} strided x, bf16 params"
            proj = leaf(batch, T, 4 * 128)
            wb, bb = (torch.randn(3 * 128, 1, 4).bfloat16().requires_grad_(True),
                      torch.randn(3 * 128).bfloat16().requires_grad_(True))
            grad(causal_conv1d_silu_triton(proj[..., 64:64 + 3 * 128], wb, bb), proj, wb, bb)
        if "norm" in only:
            for positions in (None, torch.arange(T)[None].expand(batch, T).contiguous()):
                recorder.context = f"norm {dtype} position_ids={positions is not None}"
                yn, z, w = leaf(batch, T, 256), leaf(batch, T, 256), leaf(256)
                grad(gated_rmsnorm_triton(yn, z, w, 4, 1e-5, 50, position_ids=positions), yn, z, w)
            recorder.context = f"norm {dtype} strided z, y_prefix"
            proj, yn, w = leaf(batch, T, 600), leaf(batch, T, 256), leaf(256)
            attn = leaf(batch, 4, 50, 64)
            grad(gated_rmsnorm_triton(yn, proj[..., 8:264], w, 4, 1e-5, 50,
                                      y_prefix=attn.transpose(1, 2)), yn, proj, w, attn)
            recorder.context = f"rmsnorm {dtype}"
            xn, w = leaf(T, batch, 1536), leaf(1536)
            grad(rmsnorm_triton(xn, w, 1e-5), xn, w)
            recorder.context = f"add_rmsnorm {dtype}, fp32 residual, bf16 weight"
            xn, res = leaf(T, batch, 1536), torch.randn(T, batch, 1536, requires_grad=True)
            wb = torch.ones(1536, dtype=torch.bfloat16, requires_grad=True)
            normed, summed = add_rmsnorm_triton(xn, res, wb, 1e-5)
            torch.autograd.grad(normed.float().sum() + summed.sum(), (xn, res, wb))
        if "swiglu" in only:
            recorder.context = f"swiglu {dtype}"
            xs = leaf(T, batch, 2 * 1000)
            grad(swiglu_triton(xs), xs)
        if "rope" in only:
            from kernels.rope.rope_qk import rope_qk_triton
            rows = 2
            for seq_first, packed in ((False, False), (False, True), (True, False)):
                recorder.context = f"rope {dtype} seq_first={seq_first} packed={packed}"
                if seq_first:   # megatron's [S, B, heads, dim]
                    q, k = leaf(T, rows, 8, 128), leaf(T, rows, 2, 128)
                    leaves = (q, k)
                else:           # q = C, k = B: strided views of the conv output xBC
                    xbc = leaf(rows, T, (H + 2 * G) * N)
                    q = xbc[..., H * N:(H + G) * N].view(rows, T, G, N)
                    k = xbc[..., (H + G) * N:].view(rows, T, G, N)
                    leaves = (xbc,)
                table = torch.rand(T, rows if packed else 1, 1, q.shape[-1])
                q_rot, k_rot = rope_qk_triton(q, k, table, seq_first=seq_first)
                torch.autograd.grad(q_rot.float().sum() + k_rot.float().sum(), leaves)
        if "optimizer" in only and dtype == torch.float32:
            from kernels.optimizer.step_scalars import step_scalars_triton
            for parts, separate, clip in ((1, False, 1.0), (3, True, 1.0), (1, False, 0.0)):
                recorder.context = f"optimizer step scalars parts={parts} clip={clip}"
                step_scalars_triton(torch.rand(parts), torch.rand(()), torch.zeros(()), clip,
                                    separate)
        if "cross_entropy" in only:
            from kernels.cross_entropy.cross_entropy import (_cross_entropy_stats_op,
                                                              cross_entropy_triton)
            recorder.context = f"cross_entropy {dtype}"
            logits, target = leaf(T, 1000), torch.randint(0, 1000, (T,))
            grad(cross_entropy_triton(logits, target), logits)
            recorder.context = f"cross_entropy {dtype} vocab split"
            _cross_entropy_stats_op(logits.detach(), target, 1000)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90: H100/H200)")
    parser.add_argument("--filter", default="ssd,conv,norm,swiglu,rope,cross_entropy,optimizer",
                        help="which wrappers to drive")
    args = parser.parse_args(argv)
    recorder = Recorder(GPUTarget("cuda", args.arch, 32))
    jit_module.JITFunction.run = lambda fn, *a, **k: recorder.jit_run(fn, *a, **k)
    autotuner_module.Autotuner.run = lambda tuner, *a, **k: recorder.autotune_run(tuner, *a, **k)
    drive_kernels(recorder, args.filter)
    print(f"triton {triton.__version__}, target sm_{args.arch}: {len(recorder.jobs)} compilations")
    failures = 0
    for label, context, src, options in recorder.jobs.values():
        start = time.perf_counter()
        try:
            compiled = triton.compile(src, target=recorder.target, options=options)
            note = f"ok {time.perf_counter() - start:5.1f} s, {compiled.metadata.shared} B shared"
        except Exception as error:  # noqa: BLE001 - report every failure, then exit 1
            failures += 1
            note = "FAILED\n" + "".join(traceback.format_exception_only(type(error), error))
        print(f"  [{context}] {label}: {note}", flush=True)
    print(f"{failures} failed" if failures else "all compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
