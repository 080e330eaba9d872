"""LayerNorm (no affine) followed by adaLN modulate, with its tangent.

    y = (x − μ)/σ,                m = y·(1 + scale) + shift
    ẏ = (ẋ − mean(ẋ) − y·mean(y ⊙ ẋ))/σ,   ṁ = ẏ·(1 + scale) + y·scalė + shifṫ    (DESIGN.md §2)

x: (B, N, D); shift, scale and their tangents: (B, D), broadcast over the N tokens.
"""
from typing import Tuple

import torch
import torch.nn.functional as F

from ._ref_utils import compute_dtype


# ---------------------------------------------------------------------------------------------
# Reference (pure torch)
# ---------------------------------------------------------------------------------------------
def ln_modulate_ref(x, shift, scale, eps: float = 1e-6) -> torch.Tensor:
    dt = compute_dtype(x.dtype)
    y = F.layer_norm(x.to(dt), (x.shape[-1],), eps=eps)
    return (y * (1 + scale.to(dt).unsqueeze(1)) + shift.to(dt).unsqueeze(1)).to(x.dtype)


def ln_modulate_jvp_ref(x, shift, scale, x_dot, shift_dot, scale_dot,
                        eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """(m, ṁ); m is differentiable, ṁ carries no autograd graph."""
    dt = compute_dtype(x.dtype)
    xf = x.to(dt)
    y = F.layer_norm(xf, (x.shape[-1],), eps=eps)  # (B, N, D)
    sc = scale.to(dt).unsqueeze(1)
    m = y * (1 + sc) + shift.to(dt).unsqueeze(1)
    with torch.no_grad():
        rstd = torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + eps)
        xd = x_dot.to(dt)
        y_dot = (xd - xd.mean(-1, keepdim=True) - y * (y * xd).mean(-1, keepdim=True)) * rstd
        m_dot = y_dot * (1 + sc) + y * scale_dot.to(dt).unsqueeze(1) + shift_dot.to(dt).unsqueeze(1)
    return m.to(x.dtype), m_dot.to(x.dtype)
