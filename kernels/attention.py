"""Attention forward with its tangent, and the primal backward.

Layout (B, H, N, D). With S = s·QKᵀ, P = softmax(S), O = PV (DESIGN.md §2):

    Ṡ = s·(Q̇Kᵀ + QK̇ᵀ),   Ṗ = P ⊙ (Ṡ − rowsum(P ⊙ Ṡ)),   Ȯ = ṖV + PV̇

This section holds the pure-torch reference; the Triton kernel follows it.
"""
import math
from typing import Optional, Tuple

import torch

from ._ref_utils import compute_dtype


# ---------------------------------------------------------------------------------------------
# Reference (pure torch)
# ---------------------------------------------------------------------------------------------
def _default_scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def attention_ref(q, k, v, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(scale·QKᵀ)·V in plain torch ops (fp16/bf16 computed in fp32); torch.func.jvp works on it."""
    s = _default_scale(q, scale)
    dt = compute_dtype(q.dtype)
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    p = torch.softmax((qf @ kf.transpose(-1, -2)) * s, dim=-1)  # (B, H, N, N)
    return (p @ vf).to(q.dtype)


def attention_jvp_ref(q, k, v, q_dot, k_dot, v_dot,
                      scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(O, Ȯ) by the explicit rule. O is differentiable; Ȯ carries no autograd graph."""
    s = _default_scale(q, scale)
    dt = compute_dtype(q.dtype)
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    p = torch.softmax((qf @ kf.transpose(-1, -2)) * s, dim=-1)  # (B, H, N, N)
    o = p @ vf
    with torch.no_grad():
        qd, kd, vd = q_dot.to(dt), k_dot.to(dt), v_dot.to(dt)
        s_dot = (qd @ kf.transpose(-1, -2) + qf @ kd.transpose(-1, -2)) * s
        ps = p * s_dot
        p_dot = ps - p * ps.sum(-1, keepdim=True)
        o_dot = p_dot @ vf + p @ vd
    return o.to(q.dtype), o_dot.to(q.dtype)
