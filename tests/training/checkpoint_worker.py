"""Worker for test_checkpoint_parallel.py, launched by torchrun; writes ``<tag>rank<r>.json``.

    python -m torch.distributed.run --nproc_per_node=N checkpoint_worker.py SCENARIO OUT_DIR ...

- ``reshard`` (N = 4): TP = 2 x PP = 2 trains 6 steps saving at steps 3 and 6, then the step-3
  checkpoint (copied into a new folder each time) resumes at TP = 1 x PP = 1 x DP = 4 and at
  TP = 2 x DP = 2.
- ``run CONFIG TAG [--section.key=value ...]``: one training run of the YAML run config, as
  examples/pretrain.py would do it, recording every loss exactly (the test kills or stops it).
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from checkpoint_common import copy_checkpoint, run_config  # noqa: E402


def summary(result) -> dict:
    return {"losses": {str(k): v for k, v in result.train_losses.items()},
            "layout": result.layout, "resumed_from": result.resumed_from,
            "stop_reason": result.stop_reason, "saved": result.saved}


def wait_for(path: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.05)


def scenario_reshard(out_dir: Path) -> dict:
    from megatron_transmamba.training.pretrain import pretrain
    cache, source = out_dir / "data_cache", out_dir / "tp2_pp2"
    results = {"tp2_pp2": summary(pretrain(run_config(
        cache, source, parallel={"tensor_model_parallel_size": 2,
                                 "pipeline_model_parallel_size": 2},
        checkpoint={"save_interval": 3})))}
    for name, parallel in (("tp1_dp4", {}), ("tp2_dp2", {"tensor_model_parallel_size": 2})):
        target = out_dir / name
        if int(os.environ["RANK"]) == 0:
            copy_checkpoint(source, 3, target)
        wait_for(target)
        results[name] = summary(pretrain(run_config(cache, target, resume=True,
                                                    parallel=parallel)))
    return results


def scenario_run(config: str, overrides: list) -> dict:
    from megatron_transmamba.training.config import load_run_config
    from megatron_transmamba.training.pretrain import pretrain
    return summary(pretrain(load_run_config(config, overrides)))


def main() -> None:
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    if scenario == "reshard":
        results, tag = scenario_reshard(out_dir), "reshard-"
    else:
        config, tag, overrides = sys.argv[3], sys.argv[4], sys.argv[5:]
        results = scenario_run(config, overrides)
    rank = int(os.environ["RANK"])
    (out_dir / f"{tag}rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
