"""Count the device-kernel launches and host synchronisations of a training step, on any machine.

A GPU step is host-bound when it issues more kernels than the host can launch in the time the
device needs to run them (docs/benchmarks.md, "Kernel launches per step"). What the GPU would
launch is visible on a CPU: every aten op that reaches a backend is one kernel on the GPU (give
or take what cuBLAS or SDPA split it into), and every Triton launch is one kernel. So
``LaunchCounter`` counts, under a ``TorchDispatchMode``:

- launches: each dispatched aten op except views (``op.is_view``) and allocations / metadata
  (``_NOT_LAUNCHES``), plus one per Triton kernel launch; the aten ops the Triton interpreter
  runs to emulate a kernel on the CPU are not counted (its launch is one kernel);
- host syncs: ``.item()`` / ``bool(tensor)`` (``_local_scalar_dense``), ``.tolist()``,
  ``.cpu()``, ``.numpy()``, and ops whose output shape depends on the data (``nonzero``, ...).

Each count is attributed to a region and a phase. Regions are the layers, by symbol
(``T``, ``M``, ``*``, ``-``), marked by forward hooks in forward and by identity autograd
nodes at each layer's output and input in backward (so a layer's backward is everything between
the gradient reaching its output and the gradient leaving its input, its residual-gradient sum
included); what is outside every layer (embedding, final norm, LM head, loss) is ``head``.
Phases are ``forward`` / ``backward`` (inside autograd's backward), and the step's remaining
work (zeroing gradient buffers, gradient finalisation, clipping, the optimizer update,
logging) is ``optimizer``. Adding a layer gradient into megatron-core DDP's fp32 ``main_grad``
buffer (one ``add_`` per parameter, made in DDP's backward hook) is counted apart as
``grad_accumulation``: it is DDP's cost per parameter, not the layer's.

``count_training_step(cfg)`` builds the run config's model, DDP and optimizer as ``pretrain``
does, on one process, runs a warm-up step, and counts the next one (``tools/bench/
count_launches.py`` is the command line).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Dispatched ops that allocate or only touch metadata: no kernel on a GPU.
_NOT_LAUNCHES = {
    aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
    aten.new_empty.default, aten.new_empty_strided.default, aten._unsafe_view.default,
    aten._reshape_alias.default, aten.lift_fresh.default, aten.detach_.default,
    aten.set_.source_Storage, aten.set_.source_Storage_storage_offset, aten.set_.source_Tensor,
    aten.resize_.default, aten.is_same_size.default, aten.sym_size.int, aten.sym_stride.int,
    aten.sym_numel.default, aten.sym_storage_offset.default, aten.record_stream.default,
    aten._local_scalar_dense.default, torch.ops.profiler._record_function_enter_new.default,
    torch.ops.profiler._record_function_exit._RecordFunction,
}
# Ops that make the host wait for the device (a value or a data-dependent shape is read back).
_HOST_SYNCS = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
    aten.unique_consecutive.default, aten._unique2.default, aten.unique_dim.default,
    aten.equal.default, aten.repeat_interleave.Tensor,
}
PHASES = ("forward", "backward")


@dataclass
class Counts:
    """launches[region][phase], host syncs per phase, and the op names behind each count."""

    launches: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    host_syncs: dict = field(default_factory=lambda: defaultdict(int))
    ops: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    sync_ops: dict = field(default_factory=lambda: defaultdict(int))


class LaunchCounter(TorchDispatchMode):
    """Counts launches and host syncs while active (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.counts = Counts()
        self.region = "head"
        self.step_phase: Optional[str] = None        # "optimizer" outside forward/backward
        self.main_grads: set[int] = set()            # storage pointers of DDP's grad buffers
        self.trace: list[str] = []                   # every launch in order (``triton:<kernel>``)
        self._in_triton = 0
        self._depth = 0
        self._patches: list = []

    # ---- attribution -------------------------------------------------------------------
    def phase(self) -> str:
        if self.step_phase is not None:
            return self.step_phase
        return "backward" if torch._C._current_graph_task_id() != -1 else "forward"

    def _record(self, region: str, name: str) -> None:
        phase = self.phase()
        self.trace.append(name)
        self.counts.launches[region][phase] += 1
        self.counts.ops[f"{region}/{phase}"][name] += 1

    def _sync(self, name: str) -> None:
        phase = self.phase()
        self.counts.host_syncs[phase] += 1
        self.counts.sync_ops[f"{phase}/{name}"] += 1

    # ---- aten ops ----------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "transmamba":
            # our custom ops are not kernels themselves: run the body (the backend kernel
            # registered for the device) with this mode active again, so what it launches counts
            with self:
                return func.redispatch(_backend_keys(args), *args, **kwargs)
        if not self._in_triton:
            if func in _HOST_SYNCS:
                self._sync(str(func.overloadpacket.__name__))
            if not (func.is_view or func in _NOT_LAUNCHES):
                region = self.region
                if (func is aten.add_.Tensor and self.main_grads and isinstance(args[0], torch.Tensor)
                        and args[0].untyped_storage().data_ptr() in self.main_grads):
                    region = "grad_accumulation"
                self._record(region, str(func.overloadpacket.__name__))
        return func(*args, **kwargs)

    # ---- Triton launches and host reads outside the dispatcher --------------------------
    def __enter__(self):
        # re-entered around each custom op's body (``with self`` above): patch once, at the
        # outermost entry, and restore at its exit only
        if self._depth == 0:
            self._patch_triton()
            self._patch_tensor_reads()
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for owner, name, original in reversed(self._patches):
                setattr(owner, name, original)
            self._patches.clear()
        return super().__exit__(*exc)

    def _patch(self, owner, name, wrapper) -> None:
        original = getattr(owner, name)
        self._patches.append((owner, name, original))
        setattr(owner, name, wrapper(original))

    def _patch_triton(self) -> None:
        try:
            from triton.runtime import interpreter, jit
        except ImportError:                          # no Triton: nothing to count
            return
        counter = self

        def launch(run):
            def wrapped(fn, *args, **kwargs):
                outermost = counter._in_triton == 0
                if outermost:
                    counter._record(counter.region, f"triton:{getattr(fn, '__name__', fn)}")
                counter._in_triton += 1
                try:
                    return run(fn, *args, **kwargs)
                finally:
                    counter._in_triton -= 1
            return wrapped

        self._patch(interpreter.InterpretedFunction, "run", launch)
        self._patch(jit.JITFunction, "run", launch)

    def _patch_tensor_reads(self) -> None:
        counter = self

        def reads(method, name):
            def wrapped(tensor, *args, **kwargs):
                if not counter._in_triton and not isinstance(tensor, torch.nn.Parameter):
                    counter._sync(name)
                return method(tensor, *args, **kwargs)
            return wrapped

        for name in ("tolist", "cpu", "numpy"):
            self._patch(torch.Tensor, name, partial(reads, name=name))

    # ---- regions ------------------------------------------------------------------------
    def mark_layers(self, layers, symbols) -> list:
        """Attribute each layer's forward and backward to its symbol; returns hook handles."""
        handles = []
        for layer, symbol in zip(layers, symbols):
            handles.append(layer.register_forward_pre_hook(
                partial(self._enter_layer, symbol=symbol), with_kwargs=True))
            handles.append(layer.register_forward_hook(
                partial(self._leave_layer, symbol=symbol), with_kwargs=True))
        return handles

    def _enter_layer(self, module, args, kwargs, symbol):
        self.region = symbol
        if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            # backward leaves the layer here: what follows belongs to the earlier regions
            args = (_Region.apply(args[0], self, "head"), *args[1:])
        return args, kwargs

    def _leave_layer(self, module, args, kwargs, output, symbol):
        self.region = "head"
        hidden = output[0] if isinstance(output, tuple) else output
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            # backward reaches the layer here
            hidden = _Region.apply(hidden, self, symbol)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return output


def _backend_keys(args) -> "torch._C.DispatchKeySet":
    """The dispatch key of the device of the first tensor argument (CPU or CUDA)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    cuda = bool(tensors) and tensors[0].is_cuda
    return torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA if cuda else torch._C.DispatchKey.CPU)


class _Region(torch.autograd.Function):
    """Identity whose backward switches the counter's region (no kernel either way)."""

    @staticmethod
    def forward(ctx, tensor, counter, region):
        ctx.counter, ctx.region = counter, region
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        ctx.counter.region = ctx.region
        return grad, None, None


def summarize(counts: Counts, layer_records: list[dict]) -> dict:
    """The JSON object of ``count_launches.py --json``: per layer kind the costliest layer of
    that kind (T layers: among those with 0 < p < T when there are any), plus the head, the
    optimizer step, DDP's gradient accumulation and the host syncs."""
    result: dict = {}
    for symbol in ("T", "M", "*", "-"):
        records = [r for r in layer_records if r["symbol"] == symbol]
        if symbol == "T" and any(r["inside"] for r in records):
            records = [r for r in records if r["inside"]]
        if records:
            worst = max(records, key=lambda r: r["forward"] + r["backward"])
            result[symbol] = {"forward": worst["forward"], "backward": worst["backward"]}
    head = counts.launches.get("head", {})
    result["head"] = {phase: head.get(phase, 0) for phase in PHASES}
    result["optimizer"] = sum(counts.launches.get(r, {}).get("optimizer", 0)
                              for r in list(counts.launches))
    accumulate = counts.launches.get("grad_accumulation", {})
    result["grad_accumulation"] = sum(accumulate.values())
    result["host_syncs"] = sum(counts.host_syncs.get(phase, 0) for phase in PHASES)
    result["host_syncs_step"] = sum(counts.host_syncs.values())
    result["launches_per_step"] = sum(sum(by_phase.values()) for by_phase in counts.launches.values())
    result["layers"] = layer_records
    return result


def count_training_step(cfg, shrink: bool = True, bf16: bool = True) -> dict:
    """Build ``cfg``'s model on one process as ``pretrain`` does (megatron-core DDP, its
    optimizer, the forward/backward schedule), run one warm-up step, count the next step.

    ``shrink``: replace the widths by small ones (hidden 64, 2 heads and groups of dim 16,
    FFN 128, T = 64 with the TransPoint schedule scaled): the count depends on the structure
    (layer pattern, TransPoints as fractions of T, backend, precision), not on the widths.
    ``bf16``: count the bf16 step that GPUs train (megatron-core's Float16Module and mixed
    precision optimizer, also on a CPU) rather than the float32 one.
    """
    from megatron_transmamba.parallel.initialize import (destroy_distributed,
                                                         initialize_distributed)
    from megatron_transmamba.training import build

    if shrink:
        cfg = shrunk(cfg)
    t, p = cfg.training, cfg.parallel
    if p.tensor_model_parallel_size * p.pipeline_model_parallel_size != 1:
        raise ValueError("count_launches counts one process: parallel.tensor_model_parallel_size "
                         "and pipeline_model_parallel_size must be 1")
    build.check_run_config(cfg, 1)
    model_config = build.build_model_config(cfg, bf16)
    info = initialize_distributed(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                  seed=t.seed)
    try:
        return _count(cfg, info, model_config, bf16)
    finally:
        destroy_distributed()


def shrunk(cfg):
    """``cfg`` with small widths and T = 64 in chunks of 16 (same layer pattern, backend and
    precision; TransPoints at the same fractions of T: the presets scale themselves, listed
    values are scaled here)."""
    from megatron_transmamba.training.config import load_run_config

    raw = cfg.to_dict()
    model = raw["model"]
    T = 64
    if model.get("transpoint_values"):
        scale = T / int(model.get("seq_length") or T)
        model["transpoint_values"] = [round(int(v) * scale) for v in model["transpoint_values"]]
    model.update(hidden_size=64, ffn_hidden_size=128, num_attention_heads=2,
                 num_query_groups=2, kv_channels=32, mamba_num_heads=2, mamba_num_groups=2,
                 mamba_head_dim=16, mamba_state_dim=16, seq_length=T, ssd_chunk_size=16)
    raw["training"].update(micro_batch_size=1, global_batch_size=None)
    return load_run_config(None, _as_overrides(raw))


def _as_overrides(raw: dict) -> list[str]:
    import json

    return [f"--{section}.{key}={json.dumps(value)}" for section, values in raw.items()
            for key, value in values.items()]


def _count(cfg, info, model_config, bf16: bool) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_transmamba.data.tokenizer import build_tokenizer
    from megatron_transmamba.models.language_model import TransMambaLanguageModel
    from megatron_transmamba.training import build
    from megatron_transmamba.training.optimizer_step import StepRecords, device_step
    from megatron_transmamba.training.trainer import lm_forward_step

    t = cfg.training
    device = info.device
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
    vocab = build.pad_vocab_size(tokenizer.vocab_size, t.make_vocab_size_divisible_by, 1)
    model = TransMambaLanguageModel(model_config, vocab, pg_collection=info.process_groups,
                                    init_seed=t.seed, recompute=t.recompute == "full").to(device)
    if cfg.parallel.overlap_grad_reduce:        # as pretrain: no bucket waits for a frozen one
        build.freeze_unused_parameters(model, vocab, model_config.seq_length, device)
    ddp = build.wrap_model_chunks([model], model_config, bf16, cfg.parallel.use_distributed_optimizer,
                                    cfg.parallel.overlap_grad_reduce)[0]
    with _cuda_type_names(device):
        optimizer, scheduler = build.build_optimizer(ddp, t, bf16, model_config.params_dtype,
                                                       cfg.parallel.use_distributed_optimizer)
    T, batch = model_config.seq_length, t.micro_batch_size
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, tokenizer.vocab_size, (batch, T + 1), generator=generator).to(device)
    sample = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
              "loss_mask": torch.ones(batch, T, device=device)}
    forward_backward = partial(get_forward_backward_func(), pg_collection=info.process_groups)
    forward_step = partial(lm_forward_step, device=device)
    symbols = [model_config.layer_pattern[i] for i in model.layer_range]
    counter = LaunchCounter()
    counter.main_grads = {buffer.grad_data.untyped_storage().data_ptr()
                          for buffer in ddp.buffers + ddp.expert_parallel_buffers}
    handles = counter.mark_layers(model.layers, symbols)

    def step():
        counter.step_phase = "optimizer"
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        counter.step_phase = None
        out = forward_backward(forward_step_func=forward_step, data_iterator=iter([sample]),
                               model=[ddp], num_microbatches=1, seq_length=T,
                               micro_batch_size=batch, forward_only=False)
        counter.step_phase = "optimizer"
        loss = torch.stack([d["lm loss"] for d in out]).mean()
        # the training loop's step (pretrain.py): norm, clip and skip on the device, the
        # record queued for the host (Triton's interpreter computes bf16 wrongly, so the update
        # may be skipped here: the same launches either way)
        stop_flag = torch.full((), 0.0, dtype=torch.float64, device=device)
        StepRecords(device).push(1, device_step(optimizer, loss, stop_flag, device,
                                                use_triton=model_config.mixer_backend == "triton"))
        scheduler.step(increment=1)
        counter.step_phase = None
        return loss

    # finalize_model_grads runs inside the schedule: count it with the optimizer step
    finalize = model_config.finalize_model_grads_func

    def finalize_counted(*args, **kwargs):
        counter.step_phase = "optimizer"
        try:
            return finalize(*args, **kwargs)
        finally:
            counter.step_phase = None

    model_config.finalize_model_grads_func = finalize_counted
    try:
        step()                                  # warm-up: lazy state, autotuning, caches
        counter.counts = Counts()
        with counter:
            step()
        step_counts = counter.counts
        layer_records, seen = [], {}
        for layer, symbol in zip(model.layers, symbols):
            key = (symbol, getattr(layer, "transpoint", None))   # same structure, same count
            if key not in seen:
                seen[key] = _count_layer(layer, symbol, model_config, counter, device, bf16,
                                         model.residual_stream)
            layer_records.append(dict(seen[key]))
    finally:
        for handle in handles:
            handle.remove()
        model_config.finalize_model_grads_func = finalize
    for record, index, p in zip(layer_records, model.layer_range, _transpoints(model)):
        record.update(index=index, transpoint=p,
                      inside=record["symbol"] == "T" and p is not None and 0 < p < model_config.seq_length)
    result = summarize(step_counts, layer_records)
    result["config"] = {"layer_pattern": model_config.layer_pattern, "seq_length": T,
                        "mixer_backend": model_config.mixer_backend,
                        "precision": "bf16" if bf16 else "fp32", "micro_batch_size": batch,
                        "shrunk": True}
    result["ops"] = {key: dict(sorted(ops.items(), key=lambda kv: -kv[1]))
                     for key, ops in step_counts.ops.items()}
    result["sync_ops"] = dict(step_counts.sync_ops)
    return result


@contextlib.contextmanager
def _cuda_type_names(device: torch.device):
    """megatron-core's mixed-precision optimizers accept parameters by ``Tensor.type()`` name,
    CUDA names only. To count the bf16 step on a CPU, CPU parameters answer with the CUDA name
    while the optimizer is built (nothing else changes: the same ops run)."""
    if device.type == "cuda":
        yield
        return
    original = torch.Tensor.type

    def type_name(tensor, *args, **kwargs):
        name = original(tensor, *args, **kwargs)
        if not args and not kwargs and name.startswith("torch.") and ".cuda." not in name:
            return name.replace("torch.", "torch.cuda.", 1)
        return name

    torch.Tensor.type = type_name
    try:
        yield
    finally:
        torch.Tensor.type = original


def _transpoints(model) -> list:
    return [getattr(layer, "transpoint", None) for layer in model.layers]


def _count_layer(layer, symbol: str, config, counter: LaunchCounter, device, bf16: bool,
                 residual_stream: bool = False) -> dict:
    """Forward and backward of one layer alone, on a random input with a random output
    gradient, inside the model as it trains (its DDP hooks and RoPE table; with
    ``residual_stream``, called as the model calls it: a residual in, (output, sum) out). The
    parameters' gradient accumulation is left out: DDP's adds are counted for the whole step."""
    from megatron_transmamba.layers.rotary import rope_table

    T = config.seq_length
    dtype = torch.bfloat16 if bf16 else torch.float32
    make = lambda: torch.randn(T, 1, config.hidden_size, device=device, dtype=dtype,
                               requires_grad=True)
    hidden = make()
    inputs, kwargs = [hidden], {}
    if residual_stream:
        kwargs["residual"] = make()
        inputs.append(kwargs["residual"])
    dim = config.mamba_state_dim if symbol in "TM" else config.kv_channels
    rope = rope_table(T, dim, config.rope_theta, device)
    params = [p for p in layer.parameters() if p.requires_grad]
    saved = [(p.grad, getattr(p, "main_grad", None)) for p in params]

    def forward():
        out = layer(hidden, attention_mask=None, rotary_pos_emb=rope, **kwargs)
        return list(out) if residual_stream else [out[0]]

    outs = forward()                                                     # warm-up (caches)
    torch.autograd.grad(outs, [*inputs, *params], [torch.randn_like(o) for o in outs],
                        allow_unused=True)
    counter.counts = Counts()
    with counter:
        counter.region = symbol
        outs = forward()
    grads = [torch.randn_like(o) for o in outs]
    with counter:
        counter.region = symbol
        torch.autograd.grad(outs, [*inputs, *params], grads, allow_unused=True)
    for p, (g, _) in zip(params, saved):
        p.grad = g
    launches = counter.counts.launches.get(symbol, {})
    return {"symbol": symbol, "forward": launches.get("forward", 0),
            "backward": launches.get("backward", 0),
            "host_syncs": sum(counter.counts.host_syncs.values()),
            "ops": {key: dict(ops) for key, ops in counter.counts.ops.items()}}
