"""MLP fc1 → GELU (tanh) → fc2 with its tangent (DESIGN.md §2):

    a = x W1ᵀ + b1,  h = gelu(a),  y = h W2ᵀ + b2
    ȧ = ẋ W1ᵀ,       ḣ = gelu'(a)·ȧ,  ẏ = ḣ W2ᵀ
"""
import math
from typing import Tuple

import torch
import torch.nn.functional as F

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


# ---------------------------------------------------------------------------------------------
# Reference (pure torch)
# ---------------------------------------------------------------------------------------------
def gelu_tanh(a: torch.Tensor) -> torch.Tensor:
    return F.gelu(a, approximate="tanh")


def gelu_tanh_grad(a: torch.Tensor) -> torch.Tensor:
    """d/da of 0.5·a·(1 + tanh(c·(a + 0.044715·a³))), c = √(2/π)."""
    th = torch.tanh(_SQRT_2_OVER_PI * (a + _GELU_C * a * a * a))
    return 0.5 * (1 + th) + 0.5 * a * (1 - th * th) * _SQRT_2_OVER_PI * (1 + 3 * _GELU_C * a * a)


def mlp_ref(x, w1, b1, w2, b2) -> torch.Tensor:
    return F.linear(gelu_tanh(F.linear(x, w1, b1)), w2, b2)


def mlp_jvp_ref(x, w1, b1, w2, b2, x_dot) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, ẏ); y is differentiable, ẏ carries no autograd graph."""
    a = F.linear(x, w1, b1)
    y = F.linear(gelu_tanh(a), w2, b2)
    with torch.no_grad():
        h_dot = gelu_tanh_grad(a) * F.linear(x_dot, w1)
        y_dot = F.linear(h_dot, w2)
    return y, y_dot
