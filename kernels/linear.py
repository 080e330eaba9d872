"""Dual-stream linear: o = x Wᵀ + b and ȯ = ẋ Wᵀ, the weight read once for both streams."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# Reference (pure torch)
# ---------------------------------------------------------------------------------------------
def linear_ref(x, weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def linear_jvp_ref(x, weight, bias, x_dot) -> Tuple[torch.Tensor, torch.Tensor]:
    """(o, ȯ); o is differentiable, ȯ carries no autograd graph (the weights are constants for ȯ)."""
    y = F.linear(x, weight, bias)
    with torch.no_grad():
        y_dot = F.linear(x_dot, weight)
    return y, y_dot
