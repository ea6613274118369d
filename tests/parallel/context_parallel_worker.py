"""Worker for test_context_parallel_training.py: the trainer at context-parallel layouts,
launched by torchrun; writes ``rank<r>.json`` with the losses of each run.

    python -m torch.distributed.run --nproc_per_node=N context_parallel_worker.py SCENARIO OUT_DIR
        [CORPUS]

Scenarios: ``cp2`` (N = 2): CP = 2 for all steps, CP = 2 stopped after ``STOP_AT`` with a
checkpoint in OUT_DIR/ckpt, and CP = 2 with packed documents on the indexed corpus CORPUS
(``packed_run_config``); ``world4`` (N = 4): CP = 4 resumed from a copy of that checkpoint
(OUT_DIR/ckpt_cp4), CP = 2 x TP = 2 (sequence parallel), CP = 2 x DP = 2 and CP = 2 x PP = 2;
``world8`` (N = 8): CP = 2 x PP = 2 x DP = 2.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from context_parallel_common import STOP_AT, packed_run_config, run_config  # noqa: E402


def _record(result) -> dict:
    return {"losses": {str(k): v for k, v in result.train_losses.items()},
            "layout": result.layout}


def scenario_cp2(out_dir: Path, corpus: str) -> dict:
    from megatron_transmamba.layers.packed_documents import PackedDocuments
    from megatron_transmamba.training.pretrain import pretrain
    save = str(out_dir / "ckpt")
    runs = {"cp2": _record(pretrain(run_config(out_dir, context_parallel_size=2))),
            "stopped": _record(pretrain(run_config(out_dir, save=save, exit_at_step=STOP_AT,
                                                   context_parallel_size=2)))}
    # count the shards whose rows start inside a document begun on the previous rank
    shards, continued = [], []
    plain_shard = PackedDocuments.shard

    def shard(self, rank, size):
        out = plain_shard(self, rank, size)
        shards.append(1)
        continued.append(sum(offset > 0 for offset in out.offsets))
        return out

    PackedDocuments.shard = shard
    try:
        runs["packed"] = _record(pretrain(packed_run_config(out_dir, corpus,
                                                            context_parallel_size=2)))
    finally:
        PackedDocuments.shard = plain_shard
    runs["packed"]["shards"], runs["packed"]["continued"] = len(shards), sum(continued)
    return runs


def scenario_world4(out_dir: Path) -> dict:
    from megatron_transmamba.training.pretrain import pretrain
    runs = {
        "cp4_resumed": pretrain(run_config(out_dir, save=str(out_dir / "ckpt_cp4"), resume=True,
                                           context_parallel_size=4)),
        "cp2_tp2": pretrain(run_config(out_dir, context_parallel_size=2,
                                       tensor_model_parallel_size=2, sequence_parallel=True)),
        "cp2_dp2": pretrain(run_config(out_dir, context_parallel_size=2)),
        "cp2_pp2": pretrain(run_config(out_dir, context_parallel_size=2,
                                       pipeline_model_parallel_size=2)),
    }
    return {name: _record(result) for name, result in runs.items()}


def scenario_world8(out_dir: Path) -> dict:
    from megatron_transmamba.training.pretrain import pretrain
    return {"cp2_pp2_dp2": _record(pretrain(run_config(out_dir, context_parallel_size=2,
                                                       pipeline_model_parallel_size=2)))}


def main() -> None:
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    results = {"cp2": scenario_cp2, "world4": scenario_world4,
               "world8": scenario_world8}[scenario](out_dir, *sys.argv[3:])
    (out_dir / f"rank{int(os.environ['RANK'])}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
