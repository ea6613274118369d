"""training.compile and training.cuda_graphs: compiled layers train as eager ones do, and the
combinations CUDA graphs cannot run are refused before any process group starts."""

import dataclasses

import pytest
import torch

from megatron_transmamba.training.config import build_run_config
from megatron_transmamba.training.graphs import check_cuda_graphs
from megatron_transmamba.training.pretrain import build_model_config, check_run_config, pretrain

# every layer kind; T = 32 (two chunks) with the TransPoint inside the sequence and not on a
# chunk boundary; G < H. Small T: the Triton interpreter's time grows with the chunks.
T, TRANSPOINT = 32, 20
TINY_MODEL = dict(layer_pattern="T-M-*-", hidden_size=64, ffn_hidden_size=128,
                  num_attention_heads=4, mamba_num_heads=4, mamba_num_groups=2, mamba_head_dim=16,
                  mamba_state_dim=16, seq_length=T, transpoint_schedule="fixed",
                  transpoint_values=[TRANSPOINT], ssd_chunk_size=16)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


def run_config(data_cache=None, model=None, data=None, **training):
    return build_run_config({
        "model": {**TINY_MODEL, **(model or {})},
        "data": {"cache_dir": data_cache or "unused", **(data or {})},
        "training": {"micro_batch_size": 2, "train_iters": 3, "lr_warmup_iters": 1,
                     "eval_interval": 0, "precision": "fp32", **training},
        "logging": {"progress_bar": False},
    })


def _triton_ssd_is_a_custom_op() -> bool:
    import transmamba_kernels.ssd.chunk  # noqa: F401  (registers its ops, if it has any)
    return any(name.startswith("transmamba::") and "ssd" in name
               for name in torch._C._dispatch_get_all_op_names())


@pytest.mark.parametrize("backend", [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(
        not _triton_ssd_is_a_custom_op(),
        reason="the Triton SSD is not a torch.library op yet (no transmamba::*ssd* op): Dynamo "
               "cannot trace Triton's launcher, so fullgraph compilation must fail")),
])
def test_compiled_layers_train_like_eager_ones(data_cache, backend):
    # each layer kind once and two steps: the Triton interpreter's kernels are most of the time
    model = {"mixer_backend": backend, "layer_pattern": "TM*-"}
    eager = pretrain(run_config(data_cache, model=model, train_iters=2))
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = pretrain(run_config(data_cache, model=model, train_iters=2, compile=True))
    # one graph per layer kind (T, M, *, -) at least, each without a break (compile_fullgraph)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before >= 4
    assert compiled.layout["compile"] and not eager.layout["compile"]
    assert sorted(compiled.train_losses) == [1, 2]
    for step, loss in eager.train_losses.items():
        assert compiled.train_losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-5), step


@pytest.mark.parametrize("key, value", [("compile", "yes"), ("cuda_graphs", 1),
                                        ("compile_fullgraph", "false")])
def test_option_values_are_type_checked(key, value):
    with pytest.raises(ValueError, match=f"training.{key}="):
        run_config(**{key: value})


def test_cuda_graphs_on_cpu_fail_before_any_process_group():
    cfg = run_config(cuda_graphs=True)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=r"^training.cuda_graphs needs CUDA$"):
        check_run_config(cfg, world_size=1)
    with pytest.raises(ValueError, match="training.cuda_graphs needs CUDA"):
        pretrain(cfg)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("change, message", [
    (dict(data={"reset_at_eod": True}), "data.reset_at_eod"),
    (dict(model={"hidden_dropout": 0.1}), "hidden_dropout"),
    (dict(model={"attention_dropout": 0.1}), "attention_dropout"),
    (dict(recompute="full"), "training.recompute='none'"),
    (dict(recompute="selective"), "training.recompute='none'"),
])
def test_cuda_graphs_refuse_what_they_cannot_replay(change, message):
    cfg = run_config(cuda_graphs=True, **change)
    with pytest.raises(ValueError, match=message) as error:
        check_cuda_graphs(cfg, build_model_config(cfg, False), cuda_available=True)
    assert "\n" not in str(error.value)
    ok = run_config(cuda_graphs=True)
    check_cuda_graphs(ok, build_model_config(ok, False), cuda_available=True)


def test_cuda_graphs_refuse_pipeline_parallelism():
    cfg = run_config(cuda_graphs=True)
    cfg.parallel = dataclasses.replace(cfg.parallel, pipeline_model_parallel_size=2)
    with pytest.raises(ValueError, match="parallel.pipeline_model_parallel_size=1"):
        check_cuda_graphs(cfg, build_model_config(cfg, False), cuda_available=True)


def test_compile_refuses_packed_documents():
    cfg = run_config(compile=True, data={"reset_at_eod": True})
    with pytest.raises(ValueError, match="training.compile=true does not support "
                                         "data.reset_at_eod=true"):
        check_run_config(cfg, world_size=1)


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("residual_stream", [True, False])
def test_graph_capture_wiring_keeps_the_models_math(monkeypatch, residual_stream):
    """capture_layer_graphs on the CPU with make_graphed_callables replaced by the callables
    themselves: what the graphs would capture (each layer's body, the residual stream under
    the triton backend: the first layer without a residual, the others with it) computes the
    model's loss and gradients to the bit."""
    from megatron_transmamba.config import TransMambaConfig
    from megatron_transmamba.models.language_model import TransMambaLanguageModel
    from megatron_transmamba.training.graphs import capture_layer_graphs

    model_fields = {k: v for k, v in TINY_MODEL.items() if k != "transpoint_values"}
    model_fields["layer_pattern"] = "TM*-"                     # each layer kind once
    cfg = TransMambaConfig(**model_fields, transpoint_values=[TRANSPOINT],
                           use_cpu_initialization=True, mixer_backend="triton" if residual_stream else "torch")
    model = TransMambaLanguageModel(cfg, vocab_size=64, init_seed=3)
    assert model.residual_stream is residual_stream
    ids = torch.randint(0, 64, (1, T), generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids, labels=ids).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = loss_and_grads()
    monkeypatch.setattr(torch.cuda, "make_graphed_callables",
                        lambda callables, samples, **kwargs: callables)
    assert capture_layer_graphs([model], 1, torch.device("cpu")) == len(model.layers)
    modes = [layer.forward.body.mode for layer in model.layers]
    assert modes == (["first"] + ["stream"] * 3 if residual_stream else ["plain"] * 4)
    graphed_loss, graphed_grads = loss_and_grads()
    assert torch.equal(graphed_loss, eager_loss)
    for a, b in zip(eager_grads, graphed_grads):
        assert torch.equal(a, b)
