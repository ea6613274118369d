"""Worker for test_packed_documents_parallel.py: packed documents under tensor / sequence
parallelism.

    python -m torch.distributed.run --standalone --nproc_per_node=2 packed_documents_worker.py OUT_DIR

writes ``OUT_DIR/rank<r>.json``: the logits and gradients of a micro-batch of packed documents
(the same ``cu_seqlens`` on every rank) at TP = 2 and TP = 2 + SP, against TP = 1 (DP = 2 on
the same batch), with the model of tensor_parallel_worker.py (T, M, *, - layers).
"""

import json
import os
import sys
from pathlib import Path

import torch

from megatron_transmamba.config import TransMambaConfig
from megatron_transmamba.models.language_model import TransMambaLanguageModel
from megatron_transmamba.parallel.initialize import destroy_distributed, initialize_distributed
from tensor_parallel_worker import MODEL, SEED, SEQ, VOCAB, gather_full, gather_vocab, relative

# TransPoints 0, 13 and 24: documents shorter and longer than 13, and a row of one document.
ROWS = [[5, 15, 4], [24]]


def run(tp: int, sp: bool) -> dict:
    info = initialize_distributed(tensor_model_parallel_size=tp, seed=SEED, timeout_minutes=1)
    groups = info.process_groups
    model = TransMambaLanguageModel(
        TransMambaConfig(**MODEL, tensor_model_parallel_size=tp, sequence_parallel=sp), VOCAB,
        pg_collection=groups)
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (len(ROWS), SEQ), generator=generator)
    cu_seqlens = torch.tensor([0] + [n for row in ROWS for n in row]).cumsum(0).to(torch.int32)
    logits = model(tokens, cu_seqlens=cu_seqlens)                    # [B, S, V / tp]
    cotangent = torch.randn(len(ROWS), SEQ, VOCAB, generator=generator)
    vocab = logits.shape[-1]
    rank = torch.distributed.get_rank(groups.tp)
    (logits * cotangent[..., rank * vocab:(rank + 1) * vocab]).sum().backward()
    for param in model.parameters():   # gather_full reads main_grad (as DDP would fill it)
        param.main_grad = param.grad if param.grad is not None else torch.zeros_like(param)
        if getattr(param, "sequence_parallel", False):   # finalize_model_grads' SP all-reduce
            torch.distributed.all_reduce(param.main_grad, group=groups.tp)
    out = {"logits": gather_vocab(logits.detach(), groups.tp)}
    out["grads"], out["replica_gap"] = gather_full(model, groups.tp, grads=True)
    with torch.no_grad():
        out["unpacked_logits"] = gather_vocab(model(tokens), groups.tp)
    destroy_distributed()
    return out


def main() -> None:
    out_dir = Path(sys.argv[1])
    ref = run(1, False)
    results = {"packing_changes_logits": relative(ref["logits"], ref["unpacked_logits"])}
    for name, tp, sp in (("tp2", 2, False), ("tp2_sp", 2, True)):
        layout = run(tp, sp)
        results[name] = {
            "logits": relative(ref["logits"], layout["logits"]),
            "grads": max(relative(ref["grads"][k], v) for k, v in layout["grads"].items()
                         if ref["grads"][k].abs().max() > 0),
            "replica_gap": layout["replica_gap"],
        }
    rank = int(os.environ["RANK"])
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
