#!/usr/bin/env bash
# Pretrain on NNODES machines: run this same command on every node (a c10d rendezvous; no node
# ranks to assign: the c10d rendezvous numbers the nodes).
#
#   MASTER_ADDR=node001 NNODES=4 bash examples/launch/torchrun_multi_node.sh \
#       examples/configs/transmamba_1p5b.yaml --parallel.tensor_model_parallel_size=2
#
# MASTER_ADDR: a host every node reaches (the rendezvous store runs there); MASTER_PORT
# (default 29500); NNODES; NPROC_PER_NODE (default: the node's GPU count); RDZV_ID: a job
# id shared by the nodes (default: the SLURM job id or "transmamba"). The world size is
# NNODES x NPROC_PER_NODE and DP = world size / (TP x PP). Keep TP within a node.
# On one machine, two agents with MASTER_ADDR=127.0.0.1 NNODES=2 NPROC_PER_NODE=1 stand for
# two nodes (tests/parallel/test_data_parallel.py does this).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
config="${1:?usage: torchrun_multi_node.sh CONFIG.yaml [--section.key=value ...]}"
shift
: "${MASTER_ADDR:?set MASTER_ADDR to a host all nodes reach}"
: "${NNODES:?set NNODES}"
gpus="$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
nproc="${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}"
exec python -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$nproc" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" \
  --rdzv_id="${RDZV_ID:-${SLURM_JOB_ID:-transmamba}}" \
  examples/pretrain.py --config "$config" "$@"
