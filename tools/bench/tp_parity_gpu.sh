#!/usr/bin/env bash
# TP = 2 against TP = 1 on two GPUs (NCCL, bf16): parity and step time; the report is printed
# and written to $out/report.md (no docs/results record is written yet). Arguments go to both
# launches of tools/bench/tp_parity_gpu.py, e.g.
#   bash tools/bench/tp_parity_gpu.sh --config examples/configs/transmamba_400m.yaml --steps 8
#   bash tools/bench/tp_parity_gpu.sh --model.mixer_backend=triton --sequence-parallel
# MTM_BENCH_OUT sets the output folder (default runs/tp_parity); PYTHON the interpreter.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
py="${PYTHON:-python}"
out="${MTM_BENCH_OUT:-runs/tp_parity}"
"$py" -m torch.distributed.run --standalone --nproc_per_node=1 tools/bench/tp_parity_gpu.py \
  --tp 1 --out "$out" "$@"
"$py" -m torch.distributed.run --standalone --nproc_per_node=2 tools/bench/tp_parity_gpu.py \
  --tp 2 --out "$out" "$@"
