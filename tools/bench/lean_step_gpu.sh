#!/usr/bin/env bash
# The one-H200 run of docs/benchmarks.md, "TransMamba against its baselines": model throughput
# (tools/bench/model_throughput.py) of TransMamba, Transformer, Mamba-2 and hybrid of one shape,
# in stages that each fit one 10-minute device call:
#
#   bash tools/bench/lean_step_gpu.sh 400m     # 400M, T = 8192, micro-batch 1: eager x 4, compile and CUDA graphs x 2
#   bash tools/bench/lean_step_gpu.sh long     # 1.5B at T = 8192 and 400M at T = 32768, eager
#   bash tools/bench/lean_step_gpu.sh kernels  # CUDA-graph check, fused ops, SSD kernels, vs mamba_ssm
#   bash tools/bench/lean_step_gpu.sh compare  # vs mamba_ssm (training shape), 400M T = 8192 eager + graphs
#
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
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p /tmp/mtm_packages && ln -sfn "$root/kernels" /tmp/mtm_packages/transmamba_kernels
export PYTHONPATH="/tmp/mtm_packages:$root:$PYTHONPATH" MTM_SKIP_SETUP=1 PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton_cache}"
py="${PYTHON:-python3}"
c=examples/configs
common=(--steps 8 --warmup 3 --out-dir "$out")
case "${1:-400m}" in
  400m)
    "$py" tools/bench/model_throughput.py --name h200_400m_8k_eager --seq-lengths 8192 \
      --micro-batch-sizes 1 --variants eager "${common[@]}" --time-budget-s "${EAGER_BUDGET_S:-200}" \
      --configs "$c/transmamba_400m.yaml,$c/transformer_400m.yaml,$c/mamba2_400m.yaml,$c/hybrid_400m.yaml"
    "$py" tools/bench/model_throughput.py --name h200_400m_8k_graphs --seq-lengths 8192 \
      --micro-batch-sizes 1 --variants "${GRAPH_VARIANTS:-compile,cuda_graphs}" "${common[@]}" \
      --time-budget-s "${GRAPH_BUDGET_S:-300}" \
      --configs "$c/transmamba_400m.yaml,$c/transformer_400m.yaml"
    ;;
  long)
    "$py" tools/bench/model_throughput.py --name h200_1p5b_8k --seq-lengths 8192 \
      --micro-batch-sizes 1 --variants eager,cuda_graphs "${common[@]}" --time-budget-s 300 \
      --configs "$c/transmamba_1p5b.yaml,$c/transformer_1p5b.yaml"
    "$py" tools/bench/model_throughput.py --name h200_400m_32k --seq-lengths 32768 \
      --micro-batch-sizes 1 --variants eager "${common[@]}" --time-budget-s 200 \
      --configs "$c/transmamba_400m.yaml,$c/transformer_400m.yaml"
    ;;
  kernels)
    "$py" tools/bench/check_cuda_graphs.py 2>&1 | tail -8
    "$py" tools/bench/bench_fused_ops.py --shapes training | tee "$out/fused_ops_training.jsonl"
    "$py" tools/bench/bench_ssd.py --kernels | tee "$out/ssd_kernels.jsonl"
    PYTHONPATH="${MAMBA_SRC:-$root/.mamba_src}:$PYTHONPATH" "$py" tools/bench/compare_mamba_ssm.py \
      --json "$out/h200_vs_mamba_ssm.json"
    ;;
  compare)
    PYTHONPATH="${MAMBA_SRC:-$root/.mamba_src}:$PYTHONPATH" "$py" tools/bench/compare_mamba_ssm.py \
      --quick --json "$out/h200_vs_mamba_ssm.json"
    "$py" tools/bench/model_throughput.py --name h200_400m_8k --seq-lengths 8192 \
      --micro-batch-sizes 1 --variants eager,cuda_graphs "${common[@]}" \
      --time-budget-s "${MODEL_BUDGET_S:-240}" \
      --configs "$c/transmamba_400m.yaml,$c/transformer_400m.yaml"
    ;;
  *) echo "usage: lean_step_gpu.sh 400m|long|kernels|compare" >&2; exit 2 ;;
esac
cp "$out"/*.json docs/results/ 2>/dev/null || true
