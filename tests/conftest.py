"""Shared pytest setup: makes ``tests/helpers.py`` importable, seeds every test and holds the
session's torchrun launches (``torchrun_jobs``)."""
import os
import pathlib
import sys

# Triton kernels run on the CPU through Triton's interpreter; it must be chosen before any
# kernel module is imported (the decorator reads it). GPU runs leave it unset.
if os.environ.get("MTM_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

_TESTS = str(pathlib.Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def megatron_single_process():
    """A one-process gloo group with megatron-core's parallel state (TP = PP = 1), torn down
    after the module so later tests can initialise their own."""
    from megatron_transmamba.parallel.initialize import destroy_distributed, initialize_distributed

    info = initialize_distributed(seed=1234)
    yield info
    destroy_distributed()


@pytest.fixture(scope="session")
def torchrun_jobs(request, tmp_path_factory):
    """``torchrun_jobs(job)``: the output folder and stdout of a worker run registered with
    ``torchrun_batch.job``; the registered jobs of one process count run in one launch
    (tests/parallel/torchrun_batch.py)."""
    parallel = str(pathlib.Path(_TESTS) / "parallel")
    if parallel not in sys.path:
        sys.path.insert(0, parallel)
    import torchrun_batch

    modules = {item.module.__name__ for item in request.session.items
               if getattr(item, "module", None) is not None}
    return torchrun_batch.Launcher(tmp_path_factory.mktemp("torchrun_jobs"), modules)


def pytest_terminal_summary(terminalreporter, config):
    """With --durations: the batched torchrun jobs' own times, which --durations counts in the
    setup of the first test that asked for their launch."""
    launchers = getattr(sys.modules.get("torchrun_batch"), "LAUNCHERS", [])
    lines = [line for launcher in launchers for line in launcher.summary()]
    if config.getoption("durations", None) is not None and lines:
        terminalreporter.write_sep("=", "torchrun jobs (one launch per process count)")
        for line in lines:
            terminalreporter.write_line(line)
