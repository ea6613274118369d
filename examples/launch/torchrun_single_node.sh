#!/usr/bin/env bash
# Pretrain on one machine: one process per GPU (or NPROC processes on CPU).
#
#   bash examples/launch/torchrun_single_node.sh examples/configs/transmamba_400m.yaml \
#       --parallel.tensor_model_parallel_size=2 --training.global_batch_size=64
#
# The first argument is the YAML run config; the rest are --section.key=value overrides.
# Every rank that is not tensor- or pipeline-parallel is data-parallel:
# DP = NPROC / (TP x PP). NPROC defaults to the number of visible GPUs (1 without GPUs).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
config="${1:?usage: torchrun_single_node.sh CONFIG.yaml [--section.key=value ...]}"
shift
gpus="$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
nproc="${NPROC:-$(( gpus > 0 ? gpus : 1 ))}"
exec python -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
  examples/pretrain.py --config "$config" "$@"
