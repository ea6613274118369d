#!/usr/bin/env bash
# The main job: train a tiny TransMamba on the embedded corpus (CPU is fine), via torchrun, then
# print a short sample from the newest checkpoint.
# Extra arguments are config overrides, e.g. --training.train_iters=100.
# The process count follows the layout: tensor x pipeline x context parallel size from the
# overrides (--parallel.tensor_model_parallel_size=2 runs 2 processes); MTM_NPROC sets it explicitly
# (e.g. MTM_NPROC=4 with TP=2 adds data parallelism).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash tools/setup_env.sh
py="${MTM_VENV:-$root/.venv}/bin/python"
[ "${MTM_SKIP_SETUP:-0}" = "1" ] && py=python

tp=1 pp=1 cp=1 save=runs/tiny_cpu prev=""
for arg in "$@"; do
  case "$prev" in
    --parallel.tensor_model_parallel_size) tp="$arg" ;;
    --parallel.pipeline_model_parallel_size) pp="$arg" ;;
    --parallel.context_parallel_size) cp="$arg" ;;
    --checkpoint.save) save="$arg" ;;
  esac
  case "$arg" in
    --parallel.tensor_model_parallel_size=*) tp="${arg#*=}" ;;
    --parallel.pipeline_model_parallel_size=*) pp="${arg#*=}" ;;
    --parallel.context_parallel_size=*) cp="${arg#*=}" ;;
    --checkpoint.save=*) save="${arg#*=}" ;;
  esac
  prev="$arg"
done
for value in "$tp" "$pp" "$cp" "${MTM_NPROC:-1}"; do
  if ! [[ "$value" =~ ^[1-9][0-9]*$ ]]; then
    echo "quickstart.sh: process counts and parallel sizes must be positive integers, got '$value'" >&2
    exit 2
  fi
done
nproc="${MTM_NPROC:-$((tp * pp * cp))}"

# The config and layout checked once here: an error is one line, not torchrun's failure report.
"$py" examples/pretrain.py --check "$nproc" --config examples/configs/tiny_cpu.yaml "$@" || exit $?

"$py" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
  examples/pretrain.py --config examples/configs/tiny_cpu.yaml "$@"

# A short greedy sample from the newest checkpoint (hybrid-cache generation; MTM_NO_SAMPLE=1 skips).
if [ "${MTM_NO_SAMPLE:-0}" != "1" ] && [ -f "$save/latest" ]; then
  echo "--- sample (greedy, 80 bytes) ---"
  "$py" examples/generate.py "$save" --prompt "def " --max-new-tokens 80
fi
