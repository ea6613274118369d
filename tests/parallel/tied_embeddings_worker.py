"""Worker for test_tied_embeddings_parallel.py: the trainer with a tied embedding and LM head
(``model.share_embeddings_and_output_weights``) at PP = 2, interleaved PP = 2 and TP = 2.

    python -m torch.distributed.run --nproc_per_node=2 tied_embeddings_worker.py OUT_DIR

Writes ``rank<r>.json`` (losses, grad norms, layout, how the tied weight is held) and, per run,
``<run>_rank<r>.pt`` with the tied weight of each of this rank's chunks that has one (the
first stage's embedding, the last stage's copy) after construction and after training, so the
test can compare them bitwise. The PP = 2 run also saves checkpoints at steps 3 and 5.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from data_parallel_common import TIED, run_config  # noqa: E402


def main() -> None:
    from megatron_transmamba.models.language_model import TransMambaLanguageModel
    from megatron_transmamba.training import pretrain, trainer

    built = []

    class Recorded(TransMambaLanguageModel):
        """The trainer's model, remembered so its weights can be read after training."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            weight = self.shared_embedding_or_output_weight()
            self.initial = None if weight is None else weight.detach().clone()
            built.append(self)

    trainer.TransMambaLanguageModel = Recorded
    out_dir = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    pp2 = run_config(out_dir, save=str(out_dir / "ckpt_pp2"), model=TIED,
                     pipeline_model_parallel_size=2)
    pp2.checkpoint.save_interval = 3
    configs = {
        "pp2": pp2,
        "pp2_interleaved": run_config(out_dir, model=TIED, pipeline_model_parallel_size=2,
                                      virtual_pipeline_model_parallel_size=2),
        "tp2": run_config(out_dir, model=TIED, tensor_model_parallel_size=2),
    }
    results = {}
    for name, cfg in configs.items():
        built.clear()
        result = pretrain.pretrain(cfg)
        chunks = []
        weights = {}
        for index, chunk in enumerate(built):
            weight = chunk.shared_embedding_or_output_weight()
            chunks.append({
                "pre_process": chunk.pre_process, "post_process": chunk.post_process,
                "has_tied_weight": weight is not None,
                "own_output_weight": chunk.post_process and chunk.output_layer.weight is not None,
                "shared": bool(getattr(weight, "shared", False)),
                "shared_embedding": bool(getattr(weight, "shared_embedding", False)),
                "tied_shape": list(weight.shape) if weight is not None else None})
            if weight is not None:
                weights[f"chunk{index}"] = weight.detach().clone()
                weights[f"chunk{index}_initial"] = chunk.initial
        torch.save(weights, out_dir / f"{name}_rank{rank}.pt")
        results[name] = {"losses": {str(k): v for k, v in result.train_losses.items()},
                         "grad_norms": [result.grad_norms[k] for k in sorted(result.grad_norms)],
                         "parameters": result.num_parameters, "layout": result.layout,
                         "saved": [os.path.basename(p) for p in result.saved], "chunks": chunks}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":  # dist_checkpointing starts a spawn-method Manager
    main()
