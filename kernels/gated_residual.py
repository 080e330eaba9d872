"""Gated residual x' = x + g ⊙ f with its tangent ẋ' = ẋ + ġ ⊙ f + g ⊙ ḟ (DESIGN.md §2).

x, f and their tangents: (B, N, D); the gate g and ġ: (B, D), broadcast over the N tokens.
"""
from typing import Tuple

import torch


# ---------------------------------------------------------------------------------------------
# Reference (pure torch)
# ---------------------------------------------------------------------------------------------
def gated_residual_ref(x, gate, f) -> torch.Tensor:
    return x + gate.unsqueeze(1) * f


def gated_residual_jvp_ref(x, gate, f, x_dot, gate_dot, f_dot) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x', ẋ'); x' is differentiable, ẋ' carries no autograd graph."""
    y = x + gate.unsqueeze(1) * f
    with torch.no_grad():
        y_dot = x_dot + gate_dot.unsqueeze(1) * f + gate.unsqueeze(1) * f_dot
    return y, y_dot
