"""Worker for test_tensor_parallel.py: the TransMamba LM under tensor / sequence parallelism.

    python -m torch.distributed.run --standalone --nproc_per_node=N tensor_parallel_worker.py \
        SCENARIO OUT_DIR

writes ``OUT_DIR/rank<r>.json``. Every layout is a fresh ``initialize_distributed`` in the same
launch, and every layout builds the model from the same seed: the model's initialisation does
not depend on the TP size (each parameter is drawn at full size and cut per component), which
the test checks by gathering the TP weights back into the TP = 1 layout.

- ``world2`` (N = 2): the TP = 1 reference (each rank holds the whole model; DP = 2 on identical
  batches, so every rank's result is the single-process one), then TP = 2 and TP = 2 + SP,
  compared with it: weights, logits, every parameter's gradient (gathered to full shape and
  mapped back to the TP = 1 layout) and the losses of 5 optimizer steps. The TP = 2 model is
  then saved with megatron-core dist_checkpointing through ``sharded_state_dict`` and loaded
  at TP = 1. Last, a vocabulary that does not divide by TP must raise on every rank.
- ``world4`` (N = 4): the reference, then TP = 4 and TP = 2 x DP = 2 + SP.
- ``trainer`` (N = 2): the real trainer (``pretrain``) at TP = 1 (DP = 2) and TP = 2 on the
  embedded corpus, and a TP = 2 run stopped at step 3 and resumed from its checkpoint.
"""

import json
import os
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.models.language_model import TransMambaLanguageModel
from megatron_transmamba.parallel.initialize import destroy_distributed, initialize_distributed

TIMEOUT_MINUTES = 1  # a hang fails the launch well inside the test's timeout
SEED = 1234
VOCAB, BATCH, STEPS = 64, 2, 5
H, P, G, N, FFN = 8, 8, 4, 8, 64
MODEL = dict(
    layer_pattern="T-M-*-T-T-", hidden_size=32, ffn_hidden_size=FFN, num_attention_heads=8,
    num_query_groups=4, kv_channels=8, mamba_num_heads=H, mamba_head_dim=P, mamba_num_groups=G,
    mamba_state_dim=N, seq_length=24, transpoint_schedule="list", transpoint_values=[0, 13, 24],
    ssd_chunk_size=8, use_cpu_initialization=True, params_dtype=torch.float32,
)
SEQ = MODEL["seq_length"]


def component_sizes(name: str):
    """Full (TP = 1) sizes of the components a tensor-parallel parameter stacks along its split
    dim, written independently of the model code: rank r holds its chunk of each."""
    if name.endswith("mixer.in_proj.weight"):
        return [H * P, H * P, G * N, G * N, H]                  # z, x, B, C, dt
    if name.endswith(("mixer.conv1d.weight", "mixer.conv1d.bias")):
        return [H * P, G * N, G * N]                            # x, B, C
    if name.endswith("mlp.linear_fc1.weight"):
        return [FFN, FFN]                                       # SwiGLU gate, up
    return None


def to_full(name: str, shards: list, dim: int) -> torch.Tensor:
    """Per-rank shards (rank order) -> the TP = 1 tensor."""
    sizes = component_sizes(name)
    if sizes is None:
        return torch.cat(shards, dim)
    tp = len(shards)
    pieces = [torch.split(shard, [size // tp for size in sizes], dim) for shard in shards]
    return torch.cat([torch.cat([p[i] for p in pieces], dim) for i in range(len(sizes))], dim)


def gather_full(model, tp_group, grads: bool = False) -> tuple[dict, float]:
    """{name: full tensor in the TP = 1 layout} of the parameters (or their main_grad), and the
    largest difference between the copies of a replicated tensor on the TP ranks."""
    full, replica_gap = {}, 0.0
    size = dist.get_world_size(tp_group)
    for name, param in model.named_parameters():
        tensor = (param.main_grad if grads else param).detach().float().contiguous()
        shards = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(shards, tensor, group=tp_group)
        if getattr(param, "tensor_model_parallel", False):
            full[name] = to_full(name, shards, param.partition_dim)
        else:
            replica_gap = max(replica_gap, max((s - tensor).abs().max().item() for s in shards))
            full[name] = tensor.clone()
    return full, replica_gap


def gather_vocab(logits: torch.Tensor, tp_group) -> torch.Tensor:
    shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(shards, logits.contiguous(), group=tp_group)
    return torch.cat(shards, -1)


def batches():
    generator = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS + 1):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator)
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                    "loss_mask": torch.ones(BATCH, SEQ)})
    return out


def run_layout(tp: int, sp: bool, save_dir: str = None) -> dict:
    """Build, run forward, then train 5 steps as the trainer does; everything in TP = 1 layout."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_pg_size

    from megatron_transmamba.training.config import TrainingConfig
    from megatron_transmamba.training.pretrain import build_optimizer, lm_forward_step, wrap_model

    info = initialize_distributed(tensor_model_parallel_size=tp, seed=SEED,
                                  timeout_minutes=TIMEOUT_MINUTES)
    groups = info.process_groups
    config = TransMambaConfig(**MODEL, tensor_model_parallel_size=tp, sequence_parallel=sp)
    model = TransMambaLanguageModel(config, VOCAB, pg_collection=groups)
    mixer = model.layers[0].mixer
    out = {"layout": {
        "tp": get_pg_size(groups.tp), "dp": info.data_parallel_size, "sp": config.sequence_parallel,
        "mixer_heads": mixer.heads, "mixer_groups": mixer.groups,
        "in_proj_shape": list(mixer.in_proj.weight.shape),
        "embedding_shape": list(model.embedding.word_embeddings.weight.shape),
        "fc1_shape": list(model.layers[5].mlp.linear_fc1.weight.shape),
        "embedding_scatters_sequence": model.embedding.reduce_scatter_embeddings,
    }}
    out["weights"], _ = gather_full(model, groups.tp)
    data = batches()
    seen = []
    hook = model.layers[1].register_forward_pre_hook(lambda _, args: seen.append(args[0].shape))
    with torch.no_grad():
        out["logits"] = gather_vocab(model(data[-1]["tokens"]), groups.tp)      # [B, S, V]
    hook.remove()
    out["layout"]["residual_shape"] = list(seen[0])         # [S/tp, B, d] under SP

    ddp_model = wrap_model(model, config, bf16=False)
    training = TrainingConfig(lr=1e-2, min_lr=1e-3, lr_warmup_iters=1, train_iters=STEPS,
                              weight_decay=0.1, clip_grad=1.0)
    optimizer, scheduler = build_optimizer(ddp_model, training, False, torch.float32)
    forward_backward = partial(get_forward_backward_func(), pg_collection=groups)
    losses, grad_norms = [], []
    for step in range(STEPS):
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = forward_backward(
            forward_step_func=partial(lm_forward_step, device=torch.device("cpu")),
            data_iterator=iter(data[step:step + 1]), model=[ddp_model], num_microbatches=1,
            seq_length=SEQ, micro_batch_size=BATCH, forward_only=False)
        if step == 0:
            out["grads"], out["grad_replica_gap"] = gather_full(model, groups.tp, grads=True)
        ok, grad_norm, _ = optimizer.step()
        assert ok
        scheduler.step(increment=1)
        losses.append(reduced[0]["lm loss"].item())
        grad_norms.append(grad_norm)
    out["losses"], out["grad_norms"] = losses, grad_norms
    out["trained"], out["weight_replica_gap"] = gather_full(model, groups.tp)
    if save_dir is not None:
        from megatron.core import dist_checkpointing

        os.makedirs(save_dir, exist_ok=True)
        sharded = model.sharded_state_dict()
        out["sharded_in_proj_keys"] = sorted(
            piece.key for piece in sharded["layers.0.mixer.in_proj.weight"].build())
        dist_checkpointing.save(sharded, save_dir)
    destroy_distributed()
    return out


def max_abs(ref: torch.Tensor, out: torch.Tensor) -> float:
    assert ref.shape == out.shape, (ref.shape, out.shape)
    return (ref.double() - out.double()).abs().max().item()


def relative(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max |out - ref| / max |ref|."""
    return max_abs(ref, out) / max(ref.double().abs().max().item(), 1e-30)


def compare(ref: dict, run: dict) -> dict:
    """Errors of a layout against the TP = 1 reference, JSON-ready."""
    return {
        "layout": run["layout"],
        "weights_max_abs": max(max_abs(ref["weights"][k], v) for k, v in run["weights"].items()),
        "logits_max_abs": max_abs(ref["logits"], run["logits"]),
        "grads_relative": {k: relative(ref["grads"][k], v) for k, v in run["grads"].items()},
        "grads_zero": [k for k, v in ref["grads"].items() if v.abs().max() == 0],
        "grad_replica_gap": run["grad_replica_gap"],
        "weight_replica_gap": run["weight_replica_gap"],
        "losses": run["losses"], "reference_losses": ref["losses"],
        "grad_norms": run["grad_norms"], "reference_grad_norms": ref["grad_norms"],
        "trained_relative": {k: relative(ref["trained"][k], v) for k, v in run["trained"].items()},
        "parameters": sorted(run["grads"]), "reference_parameters": sorted(ref["grads"]),
    }


def load_at_tp1(save_dir: str, saved: dict) -> dict:
    """Load the TP = 2 dist checkpoint into a TP = 1 model; compare with the TP = 2 weights."""
    from megatron.core import dist_checkpointing

    info = initialize_distributed(tensor_model_parallel_size=1, seed=SEED + 1,
                                  timeout_minutes=TIMEOUT_MINUTES)
    model = TransMambaLanguageModel(TransMambaConfig(**MODEL), VOCAB,
                                    pg_collection=info.process_groups)
    before = max(max_abs(saved[k], p.detach()) for k, p in model.named_parameters())
    state = dist_checkpointing.load(model.sharded_state_dict(), save_dir)
    model.load_state_dict(state)
    after = {k: max_abs(saved[k], p.detach()) for k, p in model.named_parameters()}
    metadata = dist_checkpointing.load_tensors_metadata(save_dir)
    shapes = {k: list(v.global_shape) for k, v in metadata.items()
              if k.startswith("layers.0.mixer.")}
    destroy_distributed()
    return {"max_abs_before_load": before, "max_abs_after_load": after, "global_shapes": shapes}


def bad_vocab() -> str:
    initialize_distributed(tensor_model_parallel_size=2, timeout_minutes=TIMEOUT_MINUTES)
    try:
        TransMambaLanguageModel(TransMambaConfig(**MODEL, tensor_model_parallel_size=2), 63)
    except ValueError as error:
        return str(error)
    finally:
        destroy_distributed()
    return "no error"


def scenario_layouts(layouts, out_dir: Path) -> dict:
    ref = run_layout(1, False)
    results = {"reference_layout": ref["layout"]}
    save_dir = str(out_dir / "dist_ckpt_tp2")
    for name, tp, sp in layouts:
        run = run_layout(tp, sp, save_dir=save_dir if name == "tp2" else None)
        results[name] = compare(ref, run)
        if name == "tp2":
            results["tp2"]["sharded_in_proj_keys"] = run["sharded_in_proj_keys"]
            results["dist_checkpoint_tp2_to_tp1"] = load_at_tp1(save_dir, run["trained"])
    return results


def scenario_trainer(out_dir: Path) -> dict:
    from megatron_transmamba.training.config import build_run_config
    from megatron_transmamba.training.pretrain import pretrain

    def run(tp, save=False, resume=False, **training):
        cfg = build_run_config({
            "model": {**{k: v for k, v in MODEL.items()
                         if k not in ("use_cpu_initialization", "params_dtype")},
                      "seq_length": 32, "transpoint_values": [0, 13, 32]},
            "data": {"cache_dir": str(out_dir / "data_cache")},
            "training": {"micro_batch_size": 2, "global_batch_size": 4, "train_iters": 6,
                         "lr": 3e-3, "min_lr": 3e-4, "lr_warmup_iters": 1, "eval_interval": 0,
                         "log_interval": 100, **training},
            "checkpoint": {"save": str(out_dir / "trainer_ckpt") if save else None,
                           "save_interval": 1000, "resume": resume},
            "parallel": {"tensor_model_parallel_size": tp},
            "logging": {"progress_bar": False},
        })
        return pretrain(cfg)

    tp1, tp2 = run(1), run(2)
    stopped = run(2, save=True, exit_at_step=3)
    resumed = run(2, save=True, resume=True)
    return {"tp1": tp1.train_losses, "tp2": tp2.train_losses,
            "tp2_stopped": stopped.train_losses, "tp2_resumed": resumed.train_losses,
            "tp1_parameters": tp1.num_parameters, "tp2_parameters": tp2.num_parameters,
            "checkpoint_files": sorted(os.listdir(out_dir / "trainer_ckpt" / "iter_0000006"))}


def main() -> None:
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    if scenario == "world2":
        results = scenario_layouts([("tp2", 2, False), ("tp2_sp", 2, True)], out_dir)
        results["bad_vocab_error"] = bad_vocab()
    elif scenario == "world4":
        results = scenario_layouts([("tp4", 4, False), ("tp2_dp2_sp", 2, True)], out_dir)
    elif scenario == "trainer":
        results = scenario_trainer(out_dir)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":  # dist_checkpointing starts a spawn-method Manager
    main()
