"""Regenerate the golden loss files of the layout-parity tests (tests/data/golden/*.json).

    python -m tests.tools.regenerate_golden [CASE ...]      (from the repository root)

trains each case's one-process run (all cases when none is named; tests/parallel/golden.py
lists them) in a temporary folder and writes its losses, gradient norms, parameter count and
run config, with the torch / megatron-core / Python versions and the machine, to its file.
Run it after a change meant to move the losses, and say in the commit why they moved;
tests/parallel/test_golden_losses.py checks the files.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    for folder in (TESTS, TESTS / "parallel"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    os.environ.setdefault("TRITON_INTERPRET", "1")   # as the tests run (conftest.py)
    import golden

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", metavar="CASE",
                        help=f"any of {', '.join(golden.CASES)} (default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.cases) - set(golden.CASES))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(golden.CASES)}")
    for case in args.cases or list(golden.CASES):
        with tempfile.TemporaryDirectory() as out_dir:
            run = golden.one_process_run(case, Path(out_dir))
        written = golden.write(case, run)
        print(f"{case}: losses {run['losses'][0]:.4f} .. {run['losses'][-1]:.4f} -> {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
