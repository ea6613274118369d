#!/usr/bin/env bash
# Train one config at named parallel layouts, one after another, then print the comparison
# table (tools/bench/parallel_layouts.py). Every layout uses the same global batch.
#   bash tools/bench/parallel_layouts.sh CONFIG OUT LAYOUT [LAYOUT ...] [-- OVERRIDES ...]
# Layouts: 1gpu, dp2, pp2, dp4, tp2_dp2, tp4 (with SP), tp2_pp2, pp2_dp2; append "+sel" or
# "+full" for selective / full recomputation (e.g. 1gpu+sel). Example (4 GPUs):
#   bash tools/bench/parallel_layouts.sh examples/configs/transmamba_1p5b.yaml runs/layouts \
#     1gpu dp2 pp2 dp4 tp4 tp2_pp2 -- --training.global_batch_size=4 \
#     --training.micro_batch_size=1 --model.mixer_backend=triton
# PYTHON sets the interpreter; STEPS (20) and WARMUP (3) the steps.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
py="${PYTHON:-python}"
config="$1"; out="$2"; shift 2
layouts=()
while [[ $# -gt 0 && "$1" != "--" ]]; do layouts+=("$1"); shift; done
[[ $# -gt 0 ]] && shift
overrides=("$@")
dist="--parallel.use_distributed_optimizer=true --parallel.overlap_grad_reduce=true"
for name in "${layouts[@]}"; do
  base="${name%%+*}"
  case "$base" in
    1gpu)    n=1; args="" ;;
    dp2)     n=2; args="$dist" ;;
    dp4)     n=4; args="$dist" ;;
    pp2)     n=2; args="--parallel.pipeline_model_parallel_size=2" ;;
    tp2_dp2) n=4; args="--parallel.tensor_model_parallel_size=2 --parallel.sequence_parallel=true $dist" ;;
    tp4)     n=4; args="--parallel.tensor_model_parallel_size=4 --parallel.sequence_parallel=true" ;;
    tp2_pp2) n=4; args="--parallel.tensor_model_parallel_size=2 --parallel.sequence_parallel=true --parallel.pipeline_model_parallel_size=2" ;;
    pp2_dp2) n=4; args="--parallel.pipeline_model_parallel_size=2 $dist" ;;
    *) echo "unknown layout '$name' (see the header of $0)" >&2; exit 2 ;;
  esac
  case "$name" in
    *+sel)  args="$args --training.recompute=selective" ;;
    *+full) args="$args --training.recompute=full" ;;
  esac
  echo "=== $name: $n process(es) $args" >&2
  # shellcheck disable=SC2086
  "$py" -m torch.distributed.run --standalone --nproc_per_node="$n" \
    tools/bench/parallel_layouts.py run "$config" --name "$name" --out "$out" \
    --steps "${STEPS:-20}" --warmup "${WARMUP:-3}" $args "${overrides[@]}" \
    || echo "=== $name failed (exit $?)" >&2
done
"$py" tools/bench/parallel_layouts.py table "$out" --reference "${layouts[0]}"
