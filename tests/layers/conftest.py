import pytest

from megatron_transmamba.parallel.initialize import destroy_distributed, initialize_distributed


@pytest.fixture(scope="package", autouse=True)
def single_process_megatron():
    """A one-process gloo group with megatron-core's parallel state (TP = PP = 1)."""
    info = initialize_distributed(seed=1234)
    yield info
    destroy_distributed()
