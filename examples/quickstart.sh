#!/usr/bin/env bash
# The main job: train a tiny TransMamba on the embedded corpus (CPU is fine), via torchrun.
# Extra arguments are config overrides, e.g. --training.train_iters=100.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash tools/setup_env.sh
py="${MTM_VENV:-$root/.venv}/bin/python"
[ "${MTM_SKIP_SETUP:-0}" = "1" ] && py=python
exec "$py" -m torch.distributed.run --standalone --nproc_per_node=1 \
  examples/pretrain.py --config examples/configs/tiny_cpu.yaml "$@"
