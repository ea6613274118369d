"""Scaling-law sweeps: plan, launch, status, collect, fit, plot, or run (all of them).

    python tools/scaling/sweep.py run examples/sweeps/tiny_cpu.yaml
    python tools/scaling/sweep.py launch examples/sweeps/gpu_scaling.yaml --mode slurm
    python tools/scaling/sweep.py --help

The code lives in ``megatron_transmamba.scaling`` (docs/scaling.md).
"""

import sys

from megatron_transmamba.scaling.cli import main

if __name__ == "__main__":
    sys.exit(main())
