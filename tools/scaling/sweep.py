"""Scaling-law sweeps: plan, launch, status, collect, fit, plot, or run (all of them).

    python tools/scaling/sweep.py run examples/sweeps/tiny_cpu.yaml
    python tools/scaling/sweep.py launch examples/sweeps/gpu_scaling.yaml --mode slurm
    python tools/scaling/sweep.py --help

The code lives in ``megatron_transmamba.scaling`` (docs/scaling.md).
"""

import sys
import warnings

# megatron-core announces on import that optional fused kernels (Apex, Transformer Engine) are
# absent; the sweep's own output is easier to read without it.
warnings.filterwarnings("ignore", message="(Transformer Engine|Apex).* not installed")

from megatron_transmamba.scaling.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
