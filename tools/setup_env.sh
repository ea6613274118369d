#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and install what it needs.
# torch is pinned to the CPU build that the development machines hold as a local file;
# never let pip resolve an unpinned torch (that downloads a multi-GB CUDA build).
# Set MTM_VENV to use another location, or MTM_SKIP_SETUP=1 to use the current Python as is.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${MTM_SKIP_SETUP:-0}" = "1" ]; then
  exit 0
fi
venv="${MTM_VENV:-$root/.venv}"
stamp="$venv/.mtm-installed"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$root/setup.py" -nt "$stamp" ]; then
  echo "setting up $venv (first run only) ..." >&2
  log="$(mktemp)"
  if ! { "$venv/bin/python" -m pip install -q --upgrade pip &&
         "$venv/bin/python" -m pip install -q "torch==2.13.0" &&
         "$venv/bin/python" -m pip install -q -e "$root[test]"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "error: installing the environment failed (log above)" >&2
    exit 1
  fi
  rm -f "$log"
  touch "$stamp"
fi
