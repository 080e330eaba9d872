"""Benchmarks run on a CUDA GPU only: without one, every case skips with a one-line reason."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU; none found")
    for item in items:
        item.add_marker(skip)
