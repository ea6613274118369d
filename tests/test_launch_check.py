"""The config check before a launch: ``examples/pretrain.py --check N`` checks a run config for
N processes in one process, and ``examples/quickstart.sh`` runs it before torchrun, so a bad
config or layout is one line on stderr and no torchrun failure report follows."""

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "MTM_SKIP_SETUP": "1", "MTM_NO_SAMPLE": "1",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(name, None)


def run(command: list) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                          timeout=180)


def test_check_accepts_a_layout_that_fits():
    result = run([sys.executable, "examples/pretrain.py", "--check", "4", "--config",
                  "examples/configs/tiny_cpu.yaml", "--parallel.tensor_model_parallel_size=2",
                  "--parallel.context_parallel_size=2"])
    assert result.returncode == 0 and not result.stdout.strip(), result.stderr


def test_quickstart_reports_a_bad_layout_in_one_line_before_torchrun():
    result = run(["bash", "examples/quickstart.sh", "--parallel.tensor_model_parallel_size=3"])
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout + result.stderr
    assert lines == ["error (config): mamba_num_heads=4 must be divisible by "
                     "tensor_model_parallel_size=3 (parallel.tensor_model_parallel_size in a run "
                     "config)"], lines
