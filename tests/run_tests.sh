#!/usr/bin/env bash
# The test suite: sets up .venv on a fresh machine, then runs pytest. Extra args go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash tools/setup_env.sh
py="${MTM_VENV:-$root/.venv}/bin/python"
[ "${MTM_SKIP_SETUP:-0}" = "1" ] && py=python
exec "$py" -m pytest tests -q --durations=25 "$@"
