"""The CPU-only patches of megatron_adapter: the CUDA tripwire over megatron-core, their scope,
the tensor-parallel RNG on the CPU, and a CPU training run of megatron-core's own layers.

The tripwire counts ``torch.cuda.`` and ``"cuda"`` / ``'cuda'`` in every megatron-core file
that our code path imports and compares them with ``megatron_core_cuda_calls.json``. Print
the current counts with ``python tests/megatron_adapter/test_cpu_patches.py``.
"""

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_transmamba import megatron_adapter
from megatron_transmamba.parallel.initialize import destroy_distributed, initialize_distributed

TABLE_PATH = Path(__file__).with_name("megatron_core_cuda_calls.json")
CPU_ONLY = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CPU-only patches are not applied when CUDA exists"
)
CPU_PATCHES = [patch for patch in megatron_adapter.inventory() if patch.cpu_only]

# What our code path imports from megatron-core; the scan covers everything these pull in.
MEGATRON_PATH_IMPORTS = (
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.mlp",
    "megatron.core.transformer.torch_norm",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.fusions.fused_bias_dropout",
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.core.optimizer_param_scheduler",
    "megatron.core.pipeline_parallel",
    "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.strategies.torch",  # save / load (sharded_state_dict)
)

_SCAN = """
import importlib, json, pathlib, sys, warnings
warnings.simplefilter("ignore")
import megatron.core
for name in sys.argv[1:]:
    importlib.import_module(name)
root = pathlib.Path(megatron.core.__file__).parent
modules = sorted(m for m in sys.modules if m.startswith("megatron.core"))
files = [getattr(sys.modules[m], "__file__", None) for m in modules]
files = sorted(pathlib.Path(f).relative_to(root).as_posix() for f in files if f)
print(json.dumps({"version": megatron.core.__version__, "root": str(root), "modules": modules,
                  "files": files}))
"""


def scan_megatron_core() -> dict:
    """Import our path in a fresh interpreter (other tests may have imported more)."""
    result = subprocess.run(
        [sys.executable, "-c", _SCAN, *MEGATRON_PATH_IMPORTS],
        capture_output=True, text=True, timeout=120, check=True,
    )
    return json.loads(result.stdout)


def count_cuda_uses(root: Path, relative_paths) -> dict:
    """{path: [count of `torch.cuda.`, count of "cuda" / 'cuda' literals]}, nonzero only."""
    counts = {}
    for path in sorted(set(relative_paths)):
        file = root / path
        text = file.read_text() if file.exists() else ""
        found = [text.count("torch.cuda."), len(re.findall(r"[\"']cuda[\"']", text))]
        if any(found):
            counts[path] = found
    return counts


def format_table(version: str, counts: dict) -> str:
    lines = [f'  "{path}": {found}' for path, found in sorted(counts.items())]
    return (
        "{\n"
        f' "megatron_core_version": "{version}",\n'
        ' "columns": ["torch.cuda.", "\\"cuda\\" or \'cuda\'"],\n'
        ' "files": {\n' + ",\n".join(lines) + "\n }\n}\n"
    )


@pytest.fixture(scope="module")
def scan():
    return scan_megatron_core()


@CPU_ONLY
def test_cuda_calls_on_our_megatron_path_are_the_reviewed_ones(scan):
    recorded = json.loads(TABLE_PATH.read_text())
    # Recorded files are recounted even when this environment does not import them (an
    # optional dependency such as triton changes the import closure).
    counts = count_cuda_uses(Path(scan["root"]), [*scan["files"], *recorded["files"]])
    changes = []
    for path in sorted(set(counts) | set(recorded["files"])):
        old, new = recorded["files"].get(path, [0, 0]), counts.get(path, [0, 0])
        if old != new:
            changes.append(
                f"  megatron/core/{path}: torch.cuda. {old[0]} -> {new[0]}, "
                f"'cuda' literals {old[1]} -> {new[1]}"
            )
    assert not changes, (
        f"CUDA uses changed in megatron-core {scan['version']} (table recorded for "
        f"{recorded['megatron_core_version']}):\n" + "\n".join(changes) + "\n"
        "Review each new call: if it runs on our CPU path, add a patch to CPU_PATCHES in "
        "megatron_transmamba/megatron_adapter/cpu.py; then update "
        f"tests/megatron_adapter/{TABLE_PATH.name} (`python "
        "tests/megatron_adapter/test_cpu_patches.py` prints the current table)."
    )


@CPU_ONLY
def test_every_patched_module_is_on_the_scanned_path(scan):
    scanned = set(scan["modules"])
    for patch in CPU_PATCHES:
        for module in patch.modules:
            assert module in scanned, f"{patch.target}: {module} is not scanned"


@CPU_ONLY
def test_patches_are_scoped_to_megatron_modules():
    import megatron.core.tensor_parallel.layers as layers

    real_current_device = torch.cuda.current_device
    megatron_adapter.apply()
    assert layers.torch.cuda.current_device() == torch.device("cpu")
    assert layers.torch.cuda.is_available is torch.cuda.is_available  # not listed: real one
    assert layers.torch.Tensor is torch.Tensor
    assert torch.cuda.current_device is real_current_device  # global torch.cuda untouched
    assert {patch.name for patch in CPU_PATCHES} <= set(megatron_adapter.applied())


@pytest.fixture
def no_cuda(monkeypatch):
    """Fail if anything reached torch.cuda's lazy init or queued a lazy CUDA call, even when
    the error was swallowed (creating a CUDA tensor raises by itself on a CPU build)."""
    lazy_init_calls = []
    real_lazy_init = torch.cuda._lazy_init

    def recording_lazy_init():
        lazy_init_calls.append(1)
        real_lazy_init()

    monkeypatch.setattr(torch.cuda, "_lazy_init", recording_lazy_init)
    queued = len(torch.cuda._queued_calls)
    yield
    assert not lazy_init_calls, "something initialized CUDA"
    assert len(torch.cuda._queued_calls) == queued, "something queued a lazy CUDA call"
    assert not torch.cuda.is_initialized()


@pytest.fixture
def single_process(no_cuda):
    info = initialize_distributed(seed=1234, timeout_minutes=1)
    yield info
    destroy_distributed()


@CPU_ONLY
def test_rng_tracker_fork_uses_cpu_generator(single_process, caplog):
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with caplog.at_level(logging.WARNING), tracker.fork():
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before), "fork must restore the default stream"
    with tracker.fork():
        second = torch.rand(4)
    assert not torch.equal(first, second), "the forked stream must advance"
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    with tracker.fork():
        assert torch.equal(torch.rand(4), first), "reseeding must replay the forked stream"
    assert "RNG state changed" not in caplog.text

    # Activation recomputation replays dropout inside fork() from the saved RNG states.
    x = torch.randn(5, 6, requires_grad=True)

    def dropout_in_fork(inp):
        with tracker.fork():
            return F.dropout(inp.tanh(), p=0.5)

    state, tracker_states = torch.get_rng_state(), tracker.get_states()
    tracker_states = {name: value.clone() for name, value in tracker_states.items()}
    plain = dropout_in_fork(x)
    plain.sum().backward()
    plain_grad, x.grad = x.grad, None
    torch.set_rng_state(state)
    tracker.set_states(tracker_states)
    recomputed = tensor_parallel.checkpoint(dropout_in_fork, False, x)
    recomputed.sum().backward()
    assert torch.equal(recomputed, plain)
    assert torch.equal(x.grad, plain_grad)


def test_bad_layout_raises_before_initializing():
    import torch.distributed as dist

    with pytest.raises(ValueError, match=r"parallel\.tensor_model_parallel_size \(3\)"):
        initialize_distributed(tensor_model_parallel_size=3)
    with pytest.raises(ValueError, match=r"parallel\.pipeline_model_parallel_size \(0\)"):
        initialize_distributed(pipeline_model_parallel_size=0)
    assert not dist.is_initialized()


def _two_layer_stack(vocab: int, hidden: int):
    """Embedding -> 2 local-spec TransformerLayers -> vocab-parallel head and loss."""
    from megatron.core import tensor_parallel
    from megatron.core.enums import ModelType
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    config = TransformerConfig(
        num_layers=2, hidden_size=hidden, num_attention_heads=4, ffn_hidden_size=2 * hidden,
        use_cpu_initialization=True, gradient_accumulation_fusion=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, hidden_dropout=0.0,
        attention_dropout=0.0, normalization="LayerNorm",
    )
    layer_spec = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=tensor_parallel.ColumnParallelLinear,
                    core_attention=DotProductAttention,
                    linear_proj=tensor_parallel.RowParallelLinear,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=tensor_parallel.ColumnParallelLinear,
                    linear_fc2=tensor_parallel.RowParallelLinear,
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )

    class Stack(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.model_type = ModelType.encoder_or_decoder
            self.embedding = tensor_parallel.VocabParallelEmbedding(
                vocab, hidden, init_method=config.init_method, config=config
            )
            self.layers = torch.nn.ModuleList(
                build_module(layer_spec, config=config, layer_number=i + 1) for i in range(2)
            )
            self.head = tensor_parallel.ColumnParallelLinear(
                hidden, vocab, config=config, init_method=config.init_method, bias=False,
                gather_output=False,
            )

        def set_input_tensor(self, tensor):  # the schedules call it; one stage needs none
            pass

        def forward(self, tokens, labels):
            hidden_states = self.embedding(tokens).transpose(0, 1)  # [B, T, D] -> [T, B, D]
            for layer in self.layers:
                hidden_states, _ = layer(hidden_states, attention_mask=None)
            logits, _ = self.head(hidden_states)  # [T, B, V]
            labels = labels.t().contiguous()  # [B, T] -> [T, B]
            return tensor_parallel.vocab_parallel_cross_entropy(logits, labels)  # [T, B]

    return config, Stack()


@CPU_ONLY
@pytest.mark.parametrize("distributed_optimizer", [True, False])
def test_single_process_training_on_cpu(single_process, distributed_optimizer):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    info = single_process
    assert (info.rank, info.world_size, info.data_parallel_size) == (0, 1, 1)
    assert (info.backend, info.device) == ("gloo", torch.device("cpu"))

    config, stack = _two_layer_stack(vocab=64, hidden=32)
    model = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer),
        stack,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=3e-3, min_lr=3e-4, weight_decay=0.01, clip_grad=0.02,
            bf16=False, use_distributed_optimizer=distributed_optimizer,
        ),
        [model],
    )
    inner = optimizer.chained_optimizers[0]
    expected = "DistributedOptimizer" if distributed_optimizer else "FP32Optimizer"
    assert type(inner).__name__ == expected
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=3e-3, max_lr=3e-3, min_lr=3e-4, lr_warmup_steps=0,
        lr_decay_steps=4, lr_decay_style="cosine", start_wd=0.01, end_wd=0.01,
        wd_incr_steps=4, wd_incr_style="constant",
    )
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (4, 16), generator=generator)  # [B, T]
    microbatches = [(tokens[:2], tokens[:2].roll(-1, 1)), (tokens[2:], tokens[2:].roll(-1, 1))]

    def forward_step(data_iterator, model):
        batch_tokens, labels = next(data_iterator)
        per_token_loss = model(batch_tokens, labels)

        def loss_func(output):
            loss = output.mean()
            return loss, {"loss": loss.detach().clone()}

        return per_token_loss, loss_func

    forward_backward = get_forward_backward_func()
    assert forward_backward.__name__ == "forward_backward_no_pipelining"
    losses, grad_norms, lrs = [], [], []
    for _ in range(3):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = forward_backward(
            forward_step_func=forward_step, data_iterator=iter(microbatches), model=model,
            num_microbatches=len(microbatches), seq_length=16, micro_batch_size=2,
            forward_only=False,
        )
        update_successful, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        assert update_successful
        losses.append(sum(r["loss"].item() for r in reduced) / len(reduced))
        grad_norms.append(grad_norm)
        lrs.append(optimizer.param_groups[0]["lr"])

    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[0] > losses[1] > losses[2], losses
    assert all(norm > 0.02 for norm in grad_norms), f"clip_grad was not exercised: {grad_norms}"
    assert lrs[0] > lrs[1] > lrs[2], f"cosine decay expected: {lrs}"
    for param in model.parameters():
        assert param.device.type == "cpu"
        assert param.main_grad.device.type == "cpu"


if __name__ == "__main__":
    scanned = scan_megatron_core()
    # Tolerates `python test_cpu_patches.py > megatron_core_cuda_calls.json` (file emptied).
    table_text = TABLE_PATH.read_text().strip() if TABLE_PATH.exists() else ""
    recorded_files = json.loads(table_text)["files"] if table_text else {}
    found = count_cuda_uses(Path(scanned["root"]), [*scanned["files"], *recorded_files])
    print(format_table(scanned["version"], found), end="")
