"""Shared pytest setup: makes ``tests/helpers.py`` importable and seeds every test."""
import pathlib
import sys

import pytest
import torch

_TESTS = str(pathlib.Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
