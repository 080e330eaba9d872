"""Shared test setup.

Without CUDA the Triton kernels run in Triton's CPU interpreter. TRITON_INTERPRET is read when a
``@triton.jit`` function is defined, so it is set here, before any test imports ``meanflow_fast.kernels``.
"""
import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def seed(request):
    """A fresh, reproducible seed per test (derived from the test's name)."""
    s = sum(map(ord, request.node.nodeid)) % (2**31)
    torch.manual_seed(s)
    return s


@pytest.fixture
def kernel_switch():
    """Set the kernels' config switches for one test: ``kernel_switch(residual_ln="apart")``."""
    from meanflow_fast.kernels import config
    with contextlib.ExitStack() as stack:
        yield lambda **switches: stack.enter_context(config.override(**switches))


def pytest_collection_modifyitems(config, items):
    """Tag every test skipped for lack of CUDA (tests.helpers.requires_cuda) with the ``gpu`` marker,
    so that a GPU machine runs exactly those with ``pytest tests/ -m gpu``."""
    for item in items:
        for mark in item.iter_markers("skipif"):
            if mark.kwargs.get("reason") == "needs a CUDA GPU":
                item.add_marker(pytest.mark.gpu)
                break
