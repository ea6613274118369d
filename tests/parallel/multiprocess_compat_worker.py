"""Worker for test_multiprocess_compat.py: run under torchrun with 2 CPU processes (gloo).

``python -m torch.distributed.run --standalone --nproc_per_node=2 multiprocess_compat_worker.py
SCENARIO OUT_DIR`` writes ``OUT_DIR/rank<r>.json``:

- ``layouts``: TP=2 ColumnParallelLinear -> RowParallelLinear (with and without
  use_cpu_initialization, and with sequence parallel), VocabParallelEmbedding and
  vocab_parallel_cross_entropy, each compared with the unsharded float64 computation on
  the gathered weights; then DP=2 with the distributed optimizer, compared with a plain
  torch AdamW on the whole batch; then PP=2 through get_forward_backward_func, 1F1B and
  interleaved (2 chunks per rank), compared with the unpipelined model. Every layout is a
  fresh initialize_distributed. Last, tensor_model_parallel_size=3 on the 2 processes: the
  error every rank raises, before any process group.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_transmamba.parallel.initialize import destroy_distributed, initialize_distributed

TIMEOUT_MINUTES = 1  # a hang fails the launch well inside the test's timeout


def _max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref.double()).abs().max().item()


def _gather(shard: torch.Tensor, dim: int, group) -> torch.Tensor:
    shards = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, shard.contiguous(), group=group)
    return torch.cat(shards, dim=dim)


def _model_parallel_config(**overrides):
    from megatron.core import ModelParallelConfig

    fields = dict(
        tensor_model_parallel_size=2,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        params_dtype=torch.float32,
    )
    fields.update(overrides)
    return ModelParallelConfig(**fields)


def check_column_row(use_cpu_initialization: bool, sequence_parallel: bool) -> dict:
    """y = RowParallel(ColumnParallel(x)); compare output and all grads with float64."""
    from megatron.core import parallel_state, tensor_parallel

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    config = _model_parallel_config(
        use_cpu_initialization=use_cpu_initialization, sequence_parallel=sequence_parallel
    )
    init = torch.nn.init.normal_
    column = tensor_parallel.ColumnParallelLinear(
        8, 12, config=config, init_method=init, bias=True, gather_output=False
    )
    row = tensor_parallel.RowParallelLinear(
        12, 6, config=config, init_method=init, bias=True, input_is_parallel=True,
        skip_bias_add=False,
    )
    with torch.no_grad():  # megatron zero-initializes biases
        column.bias.normal_()
        row.bias.normal_()

    S, B = 6, 3
    generator = torch.Generator().manual_seed(7)
    x_full = torch.randn(S, B, 8, generator=generator)  # [S, B, D]
    probe = torch.randn(S, B, 6, generator=generator)
    chunk = S // 2
    x = x_full[tp_rank * chunk : (tp_rank + 1) * chunk] if sequence_parallel else x_full
    x = x.clone().requires_grad_(True)
    hidden, _ = column(x)
    y, _ = row(hidden)
    probe_local = probe[tp_rank * chunk : (tp_rank + 1) * chunk] if sequence_parallel else probe
    (y * probe_local).sum().backward()
    for param in (column.bias, row.bias):
        if getattr(param, "sequence_parallel", False):  # what finalize_model_grads does
            dist.all_reduce(param.grad, group=tp_group)

    weight_c = _gather(column.weight.detach(), 0, tp_group).double().requires_grad_(True)
    bias_c = _gather(column.bias.detach(), 0, tp_group).double().requires_grad_(True)
    weight_r = _gather(row.weight.detach(), 1, tp_group).double().requires_grad_(True)
    bias_r = row.bias.detach().double().requires_grad_(True)
    x_ref = x_full.double().requires_grad_(True)
    y_ref = F.linear(F.linear(x_ref, weight_c, bias_c), weight_r, bias_r)
    if sequence_parallel:  # SP: the row output is reduce-scattered along the sequence
        y_ref_local = y_ref[tp_rank * chunk : (tp_rank + 1) * chunk]
    else:
        y_ref_local = y_ref
    # The SP loss is a sum over ranks: every rank's ref loss is the whole sum.
    (y_ref * probe.double()).sum().backward()
    x_ref_grad = x_ref.grad
    if sequence_parallel:
        x_ref_grad = x_ref_grad[tp_rank * chunk : (tp_rank + 1) * chunk]

    out_rows, in_cols = 12 // 2, 12 // 2
    errors = {
        "output": _max_err(y, y_ref_local),
        "grad_input": _max_err(x.grad, x_ref_grad),
        "grad_column_weight": _max_err(
            column.weight.grad, weight_c.grad[tp_rank * out_rows : (tp_rank + 1) * out_rows]
        ),
        "grad_column_bias": _max_err(
            column.bias.grad, bias_c.grad[tp_rank * out_rows : (tp_rank + 1) * out_rows]
        ),
        "grad_row_weight": _max_err(
            row.weight.grad, weight_r.grad[:, tp_rank * in_cols : (tp_rank + 1) * in_cols]
        ),
        "grad_row_bias": _max_err(row.bias.grad, bias_r.grad),
    }
    return {
        "column_weight_shape": list(column.weight.shape),
        "row_weight_shape": list(row.weight.shape),
        "max_abs_error": errors,
    }


def check_embedding_cross_entropy() -> dict:
    """VocabParallelEmbedding and vocab_parallel_cross_entropy against F.embedding / CE."""
    from megatron.core import parallel_state, tensor_parallel

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    config = _model_parallel_config()
    V, D, S, B = 10, 4, 5, 2
    embedding = tensor_parallel.VocabParallelEmbedding(
        V, D, init_method=torch.nn.init.normal_, config=config
    )
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (B, S), generator=generator)
    labels = torch.randint(0, V, (S, B), generator=generator)
    head_full = torch.randn(V, D, generator=generator)
    head = head_full[tp_rank * V // 2 : (tp_rank + 1) * V // 2].clone().requires_grad_(True)

    hidden = embedding(tokens).transpose(0, 1)  # [B, S, D] -> [S, B, D]
    # The output layer's input gradient is all-reduced, as in ColumnParallelLinear.
    hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
    logits = hidden @ head.t()  # [S, B, V / tp]
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels)  # [S, B]
    loss.sum().backward()

    weight_ref = _gather(embedding.weight.detach(), 0, tp_group).double().requires_grad_(True)
    head_ref = head_full.double().requires_grad_(True)
    logits_ref = F.embedding(tokens, weight_ref).transpose(0, 1) @ head_ref.t()
    loss_ref = F.cross_entropy(logits_ref.reshape(-1, V), labels.reshape(-1), reduction="none")
    loss_ref.sum().backward()
    rows = slice(tp_rank * V // 2, (tp_rank + 1) * V // 2)
    return {
        "embedding_weight_shape": list(embedding.weight.shape),
        "max_abs_error": {
            "loss": _max_err(loss.reshape(-1), loss_ref),
            "grad_embedding": _max_err(embedding.weight.grad, weight_ref.grad[rows]),
            "grad_head": _max_err(head.grad, head_ref.grad[rows]),
        },
    }


class _TwoLinear(torch.nn.Module):
    """x -> tanh(x W1^T + b1) W2^T + b2, the same on every rank for a given seed."""

    def __init__(self, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.first = torch.nn.Linear(8, 16)
        self.second = torch.nn.Linear(16, 4)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def check_distributed_optimizer() -> dict:
    """Two Adam steps with DP=2 and the distributed optimizer vs torch AdamW on both batches."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    config = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
    )

    class Model(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.body = _TwoLinear(seed=11)

        def forward(self, x):
            return self.body(x)

    reference = _TwoLinear(seed=11).double()
    model = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(use_distributed_optimizer=True, bucket_size=None),
        Model(),
    )
    optimizer_config = OptimizerConfig(
        optimizer="adam", lr=0.05, min_lr=0.0, weight_decay=0.0, clip_grad=0.5, bf16=False,
        use_distributed_optimizer=True,
    )
    optimizer = get_megatron_optimizer(optimizer_config, [model])
    reference_optimizer = torch.optim.AdamW(
        reference.parameters(), lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    generator = torch.Generator().manual_seed(5)
    grad_norms = []
    for _ in range(2):
        batches = [torch.randn(6, 8, generator=generator) for _ in range(dp_size)]
        targets = [torch.randn(6, 4, generator=generator) for _ in range(dp_size)]

        model.zero_grad_buffer()
        optimizer.zero_grad()
        F.mse_loss(model(batches[dp_rank]), targets[dp_rank]).backward()
        model.finish_grad_sync()
        update_successful, grad_norm, _ = optimizer.step()
        assert update_successful
        grad_norms.append(grad_norm)

        reference_optimizer.zero_grad()
        loss = sum(F.mse_loss(reference(b.double()), t.double()) for b, t in zip(batches, targets))
        (loss / dp_size).backward()
        reference_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5).item()
        grad_norms.append(reference_norm)
        reference_optimizer.step()

    inner = optimizer.chained_optimizers[0]  # get_megatron_optimizer always chains
    sharded_numel = sum(
        p.numel() for group in inner.optimizer.param_groups for p in group["params"]
    )
    params = dict(model.module.body.named_parameters())
    errors = {
        name: _max_err(params[name].detach(), ref.detach())
        for name, ref in reference.named_parameters()
    }
    return {
        "data_parallel_size": dp_size,
        "optimizer_is_distributed": isinstance(inner, DistributedOptimizer),
        "optimizer_state_numel": sharded_numel,
        "model_numel": sum(p.numel() for p in params.values()),
        "grad_norms": grad_norms,
        "max_abs_error": errors,
    }


def check_pipeline(virtual_size) -> dict:
    """PP=2 (1F1B, or interleaved with ``virtual_size`` chunks per rank) over 4 microbatches
    vs the unpipelined chain of the same blocks on the same microbatches."""
    from megatron.core import parallel_state
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    S, B, H = 3, 2, 8
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    chunks = virtual_size or 1
    num_stages = pp_size * chunks
    # Interleaving as Megatron-LM configures it. With megatron-core's default
    # batch_p2p_comm=True and PP=2, the previous and the next stage are the same rank, and one
    # batch_isend_irecv carries a gradient and an activation between the same two ranks: the
    # messages match in posting order and swap, silently (gradients off by O(1) on gloo).
    interleaving = dict(overlap_p2p_comm=True, batch_p2p_comm=False) if virtual_size else {}
    config = TransformerConfig(
        num_layers=num_stages, hidden_size=H, num_attention_heads=1,
        pipeline_model_parallel_size=pp_size, virtual_pipeline_model_parallel_size=virtual_size,
        pipeline_dtype=torch.float32, use_cpu_initialization=True,
        gradient_accumulation_fusion=False, **interleaving,
    )

    def make_blocks():
        generator = torch.Generator().manual_seed(13)
        blocks = torch.nn.ModuleList(torch.nn.Linear(H, H) for _ in range(num_stages))
        with torch.no_grad():
            for param in blocks.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        return blocks

    class Stage(MegatronModule):
        """Global stage ``stage`` of the chain: h -> tanh(block(h)), [S, B, H] throughout."""

        def __init__(self, stage: int):
            super().__init__(config)
            self.stage = stage
            self.block = make_blocks()[stage]
            self.model_type = ModelType.encoder_or_decoder
            self.input_tensor = None

        def set_input_tensor(self, tensor):
            self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

        def forward(self, x):
            return torch.tanh(self.block(x if self.stage == 0 else self.input_tensor))

    # Chunk c of pipeline rank r is global stage c * pp_size + r (megatron's interleaving).
    stages = [Stage(chunk * pp_size + pp_rank) for chunk in range(chunks)]
    generator = torch.Generator().manual_seed(17)
    microbatches = [
        (torch.randn(S, B, H, generator=generator), torch.randn(S, B, H, generator=generator))
        for _ in range(4)
    ]

    def forward_step(data_iterator, model):
        x, target = next(data_iterator)
        output = model(x)

        def loss_func(output_tensor):
            loss = F.mse_loss(output_tensor, target)
            return loss, {"loss": loss.detach().clone()}  # the schedule scales `loss` in place

        return output, loss_func

    forward_backward = get_forward_backward_func()
    losses = forward_backward(
        forward_step_func=forward_step,
        data_iterator=[iter(microbatches) for _ in stages] if virtual_size else iter(microbatches),
        model=stages, num_microbatches=len(microbatches), seq_length=S, micro_batch_size=B,
        forward_only=False,
    )

    reference = make_blocks()
    reference_losses = []
    for x, target in microbatches:
        hidden = x
        for block in reference:
            hidden = torch.tanh(block(hidden))
        loss = F.mse_loss(hidden, target)
        (loss / len(microbatches)).backward()  # megatron divides by num_microbatches
        reference_losses.append(loss.item())
    errors = {}
    for stage in stages:
        for name, param in stage.block.named_parameters():
            reference_param = getattr(reference[stage.stage], name)
            errors[f"stage{stage.stage}_grad_{name}"] = _max_err(param.grad, reference_param.grad)
    if any(stage.stage == num_stages - 1 for stage in stages):
        errors["losses"] = max(
            abs(out["loss"].item() - ref) for out, ref in zip(losses, reference_losses)
        )
    return {
        "pipeline_rank": pp_rank,
        "pipeline_size": pp_size,
        "stages": [stage.stage for stage in stages],
        "forward_backward_func": forward_backward.__name__,
        "num_losses": len(losses),
        "max_abs_error": errors,
    }


def run_layouts(rank: int) -> dict:
    results = {}
    queued_cuda_calls = len(torch.cuda._queued_calls)  # torch's import queues a few
    lazy_init_calls = []
    real_lazy_init = torch.cuda._lazy_init

    def recording_lazy_init():
        lazy_init_calls.append(1)
        real_lazy_init()

    torch.cuda._lazy_init = recording_lazy_init
    info = initialize_distributed(tensor_model_parallel_size=2, timeout_minutes=TIMEOUT_MINUTES)
    results["tp2_info"] = {"tp": info.tensor_model_parallel_size, "dp": info.data_parallel_size}
    for name, cpu_init, sp in (
        ("tp2_cpu_init", True, False),
        ("tp2_rng_tracker_init", False, False),
        ("tp2_sequence_parallel", True, True),
    ):
        results[name] = check_column_row(cpu_init, sp)
    results["tp2_embedding_cross_entropy"] = check_embedding_cross_entropy()
    destroy_distributed()

    initialize_distributed(timeout_minutes=TIMEOUT_MINUTES)
    results["dp2_distributed_optimizer"] = check_distributed_optimizer()
    destroy_distributed()

    initialize_distributed(pipeline_model_parallel_size=2, timeout_minutes=TIMEOUT_MINUTES)
    results["pp2"] = check_pipeline(virtual_size=None)
    destroy_distributed()

    initialize_distributed(
        pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
        timeout_minutes=TIMEOUT_MINUTES,
    )
    results["pp2_interleaved"] = check_pipeline(virtual_size=2)
    destroy_distributed()
    results["cuda_initialized"] = torch.cuda.is_initialized()
    results["new_cuda_queued_calls"] = len(torch.cuda._queued_calls) - queued_cuda_calls
    results["cuda_lazy_init_calls"] = len(lazy_init_calls)
    results["bad_layout"] = bad_layout()
    return results


def bad_layout() -> dict:
    start = time.monotonic()
    try:
        initialize_distributed(tensor_model_parallel_size=3, timeout_minutes=TIMEOUT_MINUTES)
    except ValueError as error:
        return {"error": str(error), "seconds": time.monotonic() - start,
                "process_group": dist.is_initialized()}
    destroy_distributed()
    return {"error": None}


def main() -> None:
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    out_file = out_dir / f"rank{rank}.json"
    if scenario == "layouts":
        out_file.write_text(json.dumps(run_layouts(rank), indent=1))
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    main()
