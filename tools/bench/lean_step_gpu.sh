#!/usr/bin/env bash
# The one-H200 run of docs/benchmarks.md, "Model throughput on one H200": model throughput
# (tools/bench/model_throughput.py) of TransMamba, Transformer, Mamba-2 and hybrid of one shape
# and our kernels against mamba_ssm's, in three stages that each fit one 10-minute device call:
#
#   bash tools/bench/lean_step_gpu.sh 400m     # 400M, T = 8192: the four models eager and with CUDA graphs,
#                                              # TransMamba and Transformer compiled and at micro-batch 2 and 4;
#                                              # T = 32768: the four with CUDA graphs
#   bash tools/bench/lean_step_gpu.sh 1p5b     # 1.5B, T = 8192: the four with CUDA graphs; T = 32768 and eager:
#                                              # TransMamba and Transformer
#   bash tools/bench/lean_step_gpu.sh eager    # 400M, T = 8192: the four models eager (host-bound: its own call)
#   bash tools/bench/lean_step_gpu.sh kernels  # SSD vs mamba_ssm (training shape, chunk 64; 64k tokens, theirs
#                                              # at chunk 256), mixer core vs SDPA + mamba_ssm at p = 0..T
#
# Every run records host and device time and kernels per step from one profiled step. Records
# are written after every run, so a stage stopped by its time limit keeps what finished;
# --time-budget-s skips what would not fit.
# mamba_ssm's Triton ops come from its source distribution, unpacked (ops/triton and utils only,
# no CUDA extensions) under .mamba_src/ (carry it; MAMBA_SRC names another folder); einops
# travels as a wheel in .whl/.
# On the device machine: megatron-core travels as a cp312 wheel in .whl/ (carry it), and the
# kernels are importable as transmamba_kernels through a link (no install). JSON records go to
# $OUT (or runs/lean_step) and docs/results/.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
out="${OUT:-runs/lean_step}"
mkdir -p "$out"
source tools/bench/device_env.sh
c=examples/configs
common=(--steps 6 --warmup 2 --out-dir "$out")
tm4="$c/transmamba_400m.yaml,$c/transformer_400m.yaml,$c/mamba2_400m.yaml,$c/hybrid_400m.yaml"
tm2="$c/transmamba_400m.yaml,$c/transformer_400m.yaml"
big4="$c/transmamba_1p5b.yaml,$c/transformer_1p5b.yaml,$c/mamba2_1p5b.yaml,$c/hybrid_1p5b.yaml"
big2="$c/transmamba_1p5b.yaml,$c/transformer_1p5b.yaml"
case "${1:-400m}" in
  400m)
    "$py" tools/bench/model_throughput.py --name h200_400m_8k --seq-lengths 8192 \
      --micro-batch-sizes 1 --variants eager,cuda_graphs --configs "$tm4" "${common[@]}" \
      --time-budget-s 200
    "$py" tools/bench/model_throughput.py --name h200_400m_8k_more --seq-lengths 8192 \
      --micro-batch-sizes 2,4 --variants cuda_graphs --configs "$tm2" "${common[@]}" \
      --time-budget-s 100
    "$py" tools/bench/model_throughput.py --name h200_400m_32k --seq-lengths 32768 \
      --micro-batch-sizes 1 --variants cuda_graphs --configs "$tm4" "${common[@]}" \
      --time-budget-s 150
    "$py" tools/bench/model_throughput.py --name h200_400m_8k_compile --seq-lengths 8192 \
      --micro-batch-sizes 1 --variants compile --configs "$tm2" "${common[@]}" \
      --time-budget-s 40
    ;;
  1p5b)
    "$py" tools/bench/model_throughput.py --name h200_1p5b_8k --seq-lengths 8192 \
      --micro-batch-sizes 1 --variants cuda_graphs --configs "$big4" "${common[@]}" \
      --time-budget-s 250
    "$py" tools/bench/model_throughput.py --name h200_1p5b_32k --seq-lengths 32768 \
      --micro-batch-sizes 1 --variants cuda_graphs --configs "$big2" --steps 4 --warmup 1 \
      --out-dir "$out" --time-budget-s 120
    "$py" tools/bench/model_throughput.py --name h200_1p5b_8k_eager --seq-lengths 8192 \
      --micro-batch-sizes 1 --variants eager --configs "$big2" "${common[@]}" \
      --time-budget-s 60
    ;;
  eager)
    "$py" tools/bench/model_throughput.py --name h200_400m_8k_eager --seq-lengths 8192 \
      --micro-batch-sizes 1 --variants eager --configs "$tm4" "${common[@]}" --time-budget-s 150
    ;;
  kernels)
    PYTHONPATH="${MAMBA_SRC:-$root/.mamba_src}:$PYTHONPATH" "$py" tools/bench/compare_mamba_ssm.py \
      --training-chunks 64 --long-chunks 256 --json "$out/h200_vs_mamba_ssm.json"
    ;;
  *) echo "usage: lean_step_gpu.sh 400m|1p5b|eager|kernels" >&2; exit 2 ;;
esac
cp "$out"/*.json docs/results/ 2>/dev/null || true
