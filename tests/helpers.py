"""Helpers shared by the tests (import as ``from tests.helpers import ...``)."""
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def randomize_(module: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Overwrite every parameter with N(0, std²): the adaLN-Zero init would hide tangent bugs."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module
