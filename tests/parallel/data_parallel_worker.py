"""Worker for test_data_parallel.py: the trainer (``pretrain``) at one data-parallel layout,
launched by torchrun; writes ``rank<r>.json`` with the losses of each run.

    python -m torch.distributed.run --nproc_per_node=2 data_parallel_worker.py SCENARIO OUT_DIR

Scenarios: ``dp2`` (N = 2): DP = 2 with the distributed optimizer and overlapped gradient
reduction, DP = 2 with neither, and the distributed-optimizer run stopped at step 3 and
resumed; ``world4`` (N = 4): TP = 2 x DP = 2, TP = 2 x PP = 2 and PP = 2 x DP = 2 (with
selective recomputation of the mixer core, the attention core and the MLP); ``nodes`` (two agents of N = 1 each, --nnodes=2): DP = 2 across the two "nodes".
Every run uses the global batch of ``run_config`` (gradient accumulation at DP = 2).
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from data_parallel_common import run_config  # noqa: E402


def scenario_dp2(out_dir: Path) -> dict:
    from megatron_transmamba.training.pretrain import pretrain
    save = str(out_dir / "ckpt")
    runs = {
        "distributed_optimizer": pretrain(run_config(out_dir)),
        "plain": pretrain(run_config(out_dir, use_distributed_optimizer=False,
                                     overlap_grad_reduce=False)),
        "stopped": pretrain(run_config(out_dir, save=save, exit_at_step=3)),
        "resumed": pretrain(run_config(out_dir, save=save, resume=True)),
    }
    out = {name: {str(k): v for k, v in r.train_losses.items()} for name, r in runs.items()}
    out["checkpoint_files"] = sorted(os.listdir(out_dir / "ckpt" / "iter_0000005"))
    out["layout"] = runs["distributed_optimizer"].layout
    return out


def scenario_world4(out_dir: Path) -> dict:
    from megatron_transmamba.training.pretrain import pretrain
    runs = {"tp2_dp2": pretrain(run_config(out_dir, tensor_model_parallel_size=2)),
            "tp2_pp2": pretrain(run_config(out_dir, tensor_model_parallel_size=2,
                                           pipeline_model_parallel_size=2)),
            "pp2_dp2": pretrain(run_config(
                out_dir, pipeline_model_parallel_size=2, use_distributed_optimizer=True,
                training={"recompute": "selective", "recompute_modules": ["core_attn", "mlp"]}))}
    return {name: {"losses": {str(k): v for k, v in r.train_losses.items()}, "layout": r.layout}
            for name, r in runs.items()}


def scenario_pp2(out_dir: Path) -> dict:
    """PP = 2 (even split 5 + 5), PP = 2 split at '|' marks (3 + 7), and interleaved PP = 2 with
    2 chunks per rank (3 + 3 + 2 + 2 layers), each with the distributed optimizer."""
    from megatron_transmamba.training.pretrain import pretrain
    runs = {
        "pp2": pretrain(run_config(out_dir, pipeline_model_parallel_size=2)),
        "pp2_marks": pretrain(run_config(out_dir, pipeline_model_parallel_size=2,
                                         model={"layer_pattern": "T-M|-*-T-T-"})),
        "pp2_interleaved": pretrain(run_config(out_dir, pipeline_model_parallel_size=2,
                                               virtual_pipeline_model_parallel_size=2)),
    }
    return {name: {"losses": {str(k): v for k, v in r.train_losses.items()}, "layout": r.layout,
                   "grad_norms": [r.grad_norms[k] for k in sorted(r.grad_norms)],
                   "parameters": r.num_parameters} for name, r in runs.items()}


def scenario_nodes(out_dir: Path) -> dict:
    from megatron_transmamba.training.pretrain import pretrain
    result = pretrain(run_config(out_dir))
    return {"distributed_optimizer": {str(k): v for k, v in result.train_losses.items()},
            "layout": result.layout}


def main() -> None:
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    results = {"dp2": scenario_dp2, "world4": scenario_world4, "pp2": scenario_pp2,
               "nodes": scenario_nodes}[scenario](out_dir)
    rank = int(os.environ["RANK"])
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
