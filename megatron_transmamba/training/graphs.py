"""Less host work per training step: regional ``torch.compile`` and per-layer CUDA graphs.

Both act on the layers of each model chunk, one layer at a time, and leave the model's math,
parameter names and checkpoints as they are (issue #15, the "lean training step"):

- ``compile_layers`` (``training.compile``): each layer is compiled on its own with
  ``nn.Module.compile`` before megatron-core's DDP wraps the chunk, as torchtitan does
  (regional compilation: a compile per layer kind, not one of the whole model, so compile time
  stays short and the embedding, LM head and pipeline schedule stay eager). ``dynamic=False``:
  one graph per shape; evaluation (``eval()``, no grad) compiles a second one per layer kind.
  ``training.compile_fullgraph`` (default true) makes a graph break an error naming its cause
  instead of a silent fall back to partly eager layers. Packed documents
  (``data.reset_at_eod``) are refused: the layers would receive a ``PackedDocuments`` whose
  document spans are host data that change with every batch (a recompile per batch).
- ``capture_layer_graphs`` (``training.cuda_graphs``): each layer's forward and backward are
  captured with ``torch.cuda.make_graphed_callables`` after DDP, the optimizer and a resumed
  checkpoint have put every parameter where it stays (the graphs read parameters in place;
  the optimizer updates them in place). All layers of a chunk are captured in one call, in
  forward order, so they share one memory pool and replay as they were captured. A training
  step then costs one graph launch per layer and direction instead of its kernels; the
  embedding, LM head, loss, optimizer and gradient reduction stay eager. Under the residual
  stream (the triton backend's fused add + norm) the graphs take and return it. With both options,
  each layer's forward is compiled (not the layer, so ``compile_layers`` is not used) and the
  compiled kernels are what the graphs capture.

Limits of CUDA graphs (``check_cuda_graphs`` refuses the rest with a one-line error before any
process group starts): static shapes (one micro-batch size and T); a layer's input is copied
into the graph's own buffer and its output and gradients are the graph's buffers, valid until
the next replay, so one micro-batch must finish its backward before the next forward, which
rules out pipeline parallelism (1F1B keeps several micro-batches in flight); the RoPE table is
a constant of the graph (it depends on T only); no packed documents (their layout changes with
every batch and is read on the host), no dropout (the graph would replay the same mask) and no
activation recomputation (megatron-core's saves and restores RNG states, which a capture
cannot); evaluation and ``eval()`` run the layers eagerly. A captured layer must not copy
host data to the GPU in its forward: the torch mixer backend's chunked SSD reference does
(``transmamba_kernels.ssd.naive``), so only the triton backend can be captured for now.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from megatron_transmamba import megatron_adapter
from megatron_transmamba.layers.norm import PLAIN
from megatron_transmamba.layers.rotary import rope_table


def check_compile(cfg) -> None:
    """Raise ValueError for what ``training.compile`` does not support."""
    if cfg.training.compile and cfg.data.reset_at_eod:
        raise ValueError("training.compile=true does not support data.reset_at_eod=true: the "
                         "layers receive a PackedDocuments whose document spans change with "
                         "every batch and are read on the host (a recompile per batch); turn "
                         "one of them off")


def check_cuda_graphs(cfg, model_config, cuda_available: bool) -> None:
    """Raise ValueError (one line, naming the keys) for what ``training.cuda_graphs`` does not
    support; called before any process group starts."""
    if not cfg.training.cuda_graphs:
        return
    if not cuda_available:
        raise ValueError("training.cuda_graphs needs CUDA")
    if cfg.data.reset_at_eod:
        raise ValueError("training.cuda_graphs does not support data.reset_at_eod=true (packed "
                         "documents change shape with every batch)")
    if model_config.hidden_dropout or model_config.attention_dropout:
        raise ValueError("training.cuda_graphs needs model.hidden_dropout = "
                         "model.attention_dropout = 0 (a graph replays the same dropout mask)")
    if cfg.training.recompute != "none":
        raise ValueError(f"training.cuda_graphs needs training.recompute='none' (got "
                         f"{cfg.training.recompute!r}: recomputation restores RNG states, which "
                         "a CUDA graph capture cannot)")
    if cfg.parallel.pipeline_model_parallel_size > 1:
        raise ValueError("training.cuda_graphs needs parallel.pipeline_model_parallel_size=1 "
                         "(a layer's graph holds one micro-batch at a time; 1F1B keeps several "
                         "in flight)")


def _register_dynamo_polyfills() -> None:
    """What torch.compile needs of megatron-core 0.16 to trace a layer without a graph break:
    the ``megatron_adapter`` patch ``compiled_tp_group_without_warning`` (compiled code only)."""
    megatron_adapter.apply_on_demand("compiled_tp_group_without_warning")


def _raise_recompile_limits(chunks: list) -> None:
    # Every layer's compiled graphs hang on one shared code object (Module._call_impl, or the
    # layer class's forward): a graph per layer kind and TransPoint, for training and for
    # evaluation. torch's default limit (8) would silently leave the rest eager.
    _register_dynamo_polyfills()
    limit = max(8, 2 * sum(len(chunk.layers) for chunk in chunks) + 2)
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, limit)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * limit)


def compile_layers(chunks: list, fullgraph: bool = True) -> None:
    """Compile every layer of every model chunk on its own, in place (names unchanged)."""
    _raise_recompile_limits(chunks)
    for chunk in chunks:
        for layer in chunk.layers:
            layer.compile(fullgraph=fullgraph, dynamic=False)


class _LayerBody(nn.Module):
    """What a graph captures of one layer, with its RoPE table held constant: hidden [S, B, d]
    -> hidden (``mode`` "plain"), or the residual stream (models/language_model.py): hidden ->
    (output, hidden) for a chunk's first layer ("first", residual None) and (hidden, residual)
    -> (output, hidden + residual) for the others ("stream"). ``layer`` is registered, so the
    graph's parameters are the layer's own."""

    def __init__(self, layer: nn.Module, forward, rope, mode: str = "plain"):
        super().__init__()
        self.layer = layer
        self.eager_forward = layer.forward
        self.captured_forward = forward          # eager_forward, or compiled
        self.rope = rope
        self.mode = mode

    def forward(self, hidden: Tensor, residual: Tensor | None = None):
        if self.mode == "plain":
            return self.captured_forward(hidden, attention_mask=None, rotary_pos_emb=self.rope)[0]
        out, summed = self.captured_forward(hidden, attention_mask=None,
                                            rotary_pos_emb=self.rope, residual=residual)
        # with no residual the sum is the input itself: a graph's output must be its own buffer
        return out, (summed.clone() if summed is hidden else summed)


class _GraphedLayerForward:
    """Replaces ``layer.forward``: the captured graph in training with gradients, the eager
    forward otherwise (evaluation, the no-grad probe)."""

    def __init__(self, layer: nn.Module, body: _LayerBody):
        self.layer, self.body = layer, body
        self.takes_residual_stream = body.mode != "plain"     # read by the model's loop

    def __call__(self, hidden_states: Tensor, attention_mask=None, rotary_pos_emb=None,
                 packed_seq_params=None, residual=PLAIN, **kwargs):
        body = self.body
        if not (self.layer.training and torch.is_grad_enabled()):
            return body.eager_forward(hidden_states, attention_mask=attention_mask,
                                      rotary_pos_emb=rotary_pos_emb,
                                      packed_seq_params=packed_seq_params, residual=residual,
                                      **kwargs)
        if attention_mask is not None or packed_seq_params is not None or kwargs:
            raise RuntimeError("a CUDA-graphed layer takes only hidden states and the RoPE table")
        if (rotary_pos_emb is None) != (body.rope is None) or (
                rotary_pos_emb is not None and rotary_pos_emb.shape != body.rope.shape):
            raise RuntimeError("a CUDA-graphed layer got a RoPE table unlike the captured one")
        expected = {"plain": "no residual", "first": "residual None",
                    "stream": "a residual tensor"}[body.mode]
        given = ("no residual" if residual is PLAIN else "residual None" if residual is None
                 else "a residual tensor")
        if given != expected:
            raise RuntimeError(f"a CUDA-graphed layer captured with {expected} got {given}")
        if body.mode == "plain":
            return body(hidden_states), None
        return body(hidden_states) if residual is None else body(hidden_states, residual)


@contextlib.contextmanager
def capturable_streams(enabled: bool):
    """Run the block (megatron-core's DDP wrapping) on a side stream when ``enabled``.

    DDP keeps each parameter's gradient accumulator node, created by its constructor; a node
    remembers the stream current at its creation. Created on the legacy default stream, a
    captured backward would have to make that stream wait for the capture, which CUDA refuses
    ("operation would make the legacy stream depend on a capturing blocking stream")."""
    if not enabled:
        yield
        return
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream().wait_stream(side)


def _layer_rope(model, index: int, seq_len: int, device) -> Tensor | None:
    """The RoPE table the model passes to layer ``index`` (models/language_model.py)."""
    dim = (model.mixer_rope_dim if model.config.layer_pattern[index] in "TM"
           else model.attention_rope_dim)
    return rope_table(seq_len, dim, model.config.rope_theta, device) if dim else None


def capture_layer_graphs(chunks: list, micro_batch_size: int, device: torch.device,
                         compile_fullgraph: bool | None = None) -> int:
    """Capture forward and backward of every layer of every chunk (see the module docstring);
    returns the number of layers captured. The warm-up runs draw their inputs from a forked
    RNG, so the run's random streams are those of an eager run.

    ``compile_fullgraph`` not None (``training.compile`` with ``cuda_graphs``): each layer's
    forward is compiled (``torch.compile``, that fullgraph) and the compiled kernels captured;
    the layers must not have been compiled with ``compile_layers``."""
    if compile_fullgraph is not None:
        _raise_recompile_limits(chunks)
    captured = 0
    for chunk in chunks:
        config = chunk.config
        seq_len = config.seq_length
        rows = seq_len // config.tensor_model_parallel_size if config.sequence_parallel \
            else seq_len
        bodies, samples = [], []
        stream = getattr(chunk, "residual_stream", False)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for position, (index, layer) in enumerate(zip(chunk.layer_range, chunk.layers)):
                forward = layer.forward
                if compile_fullgraph is not None:
                    forward = torch.compile(forward, fullgraph=compile_fullgraph, dynamic=False)
                mode = "plain" if not stream else "first" if position == 0 else "stream"
                bodies.append(_LayerBody(layer, forward, _layer_rope(chunk, index, seq_len, device),
                                         mode))
                sample = lambda: torch.randn(rows, micro_batch_size, config.hidden_size,
                                             device=device, dtype=config.params_dtype,
                                             requires_grad=True)
                samples.append((sample(),) if mode != "stream" else (sample(), sample()))
            if not bodies:
                continue
            graphed = torch.cuda.make_graphed_callables(tuple(bodies), tuple(samples),
                                                        allow_unused_input=True)
        for layer, body in zip(chunk.layers, graphed):
            layer.forward = _GraphedLayerForward(layer, body)
        captured += len(bodies)
    return captured
