"""Fixtures of the parallel tests: the one-process runs that every layout is compared with."""

import pytest


@pytest.fixture(scope="session")
def one_process_run(tmp_path_factory):
    """``one_process_run(case)``: the one-process run of a golden case (golden.py: losses and
    gradient norms of every step, parameter count, run config), trained once per session and
    shared by the parity tests of that case and by test_golden_losses.py."""
    import golden

    runs = {}

    def run(case: str) -> dict:
        if case not in runs:
            runs[case] = golden.one_process_run(case, tmp_path_factory.mktemp(case))
        return runs[case]

    return run
