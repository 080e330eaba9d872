"""The iMF DiT's ops in pure torch, each with its explicit tangent rule (docs/DESIGN.md, "8 Improved
MeanFlow (iMF): the model").

    y = rms_norm_ref(x, w, eps)                  y = x·r·w,  r = (mean(x²) + eps)^(−1/2)   (last dim)
    ẏ = w·r·(ẋ − n·mean(n ⊙ ẋ)),  n = x·r                                                (weight constant)

    y = rope_ref(x, cos, sin)                    pairs (x₂ᵢ, x₂ᵢ₊₁) rotated by the angle of their position
    ẏ = rope_ref(ẋ, cos, sin)                    (linear in x)

    q', k' = qk_norm_rope_ref(...)               rope(rms_norm(q)), rope(rms_norm(k)) per head

    y = swiglu_ref(x, w1, w3, w2)                y = (silu(a) ⊙ b) W2ᵀ,  a = x W1ᵀ,  b = x W3ᵀ
    ẏ = (silu'(a)·ȧ ⊙ b + silu(a) ⊙ ḃ) W2ᵀ,      silu'(a) = σ(a)·(1 + a·(1 − σ(a)))

    y = channel_gated_residual_ref(x, g, f)      y = x + f ⊙ g,  g a (D,) parameter
    ẏ = ẋ + ḟ ⊙ g                                (the gate has no tangent)

Each ``*_jvp_ref`` returns the primal differentiable and the tangent without an autograd graph, as the
DiT's references do (``kernels/__init__``). Linear and attention reuse ``linear_jvp_ref`` and
``attention_jvp_ref``. fp16/bf16 inputs are computed in fp32 and returned in their dtype; fp32 and fp64
as given. These are the references of the iMF Triton kernels to come, one op a file.
"""
from typing import Tuple

import torch
import torch.nn.functional as F

from .reference import compute_dtype


# ---------------------------------------------------------------------------------------------
# RMSNorm (over the last dim, with a weight)
# ---------------------------------------------------------------------------------------------
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    dt = compute_dtype(x.dtype)
    xf = x.to(dt)
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (xf * r * weight.to(dt)).to(x.dtype)


def rms_norm_jvp_ref(x, weight, x_dot, eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, ẏ); y is differentiable, ẏ carries no autograd graph."""
    y = rms_norm_ref(x, weight, eps)
    with torch.no_grad():
        dt = compute_dtype(x.dtype)
        xf, xd = x.to(dt), x_dot.to(dt)
        r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        n = xf * r
        y_dot = (r * (xd - n * (n * xd).mean(-1, keepdim=True)) * weight.to(dt)).to(x.dtype)
    return y, y_dot


# ---------------------------------------------------------------------------------------------
# RoPE (1-D, adjacent pairs rotated as complex numbers)
# ---------------------------------------------------------------------------------------------
def rope_cos_sin(num_tokens: int, head_dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32,
                 device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles n·θ^(−2i/head_dim), (num_tokens, head_dim/2), for positions n = 0, 1, …
    The angles are formed in ``dtype``: fp32 gives the official implementation's table bit for bit."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE (pairs of channels), got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=dtype, device=device) / head_dim))
    angles = torch.outer(torch.arange(num_tokens, dtype=dtype, device=device), inv_freq)
    return torch.cos(angles), torch.sin(angles)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, N, H, D), cos and sin (N, D/2): (x₂ᵢ + i·x₂ᵢ₊₁)·(cos + i·sin) for every pair. Linear in x, so
    it is also its own tangent rule."""
    dt = compute_dtype(x.dtype)
    pairs = x.to(dt).unflatten(-1, (-1, 2))          # (B, N, H, D/2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    c, s = cos.to(dt)[:, None, :], sin.to(dt)[:, None, :]  # (N, 1, D/2): broadcast over heads
    return torch.stack([re * c - im * s, re * s + im * c], dim=-1).flatten(-2).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# QK-norm + RoPE: per-head RMSNorm of q and k, then RoPE
# ---------------------------------------------------------------------------------------------
def qk_norm_rope_ref(q, k, q_weight, k_weight, cos, sin, eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, N, H, D), weights (D,), cos and sin (N, D/2) → (q', k'), same layout."""
    return (rope_ref(rms_norm_ref(q, q_weight, eps), cos, sin),
            rope_ref(rms_norm_ref(k, k_weight, eps), cos, sin))


def qk_norm_rope_jvp_ref(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot,
                         eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q', q̇', k', k̇'): the RMSNorm rule, then RoPE on both streams. Primals differentiable, tangents
    without an autograd graph."""
    qn, qn_dot = rms_norm_jvp_ref(q, q_weight, q_dot, eps)
    kn, kn_dot = rms_norm_jvp_ref(k, k_weight, k_dot, eps)
    with torch.no_grad():
        q_dot, k_dot = rope_ref(qn_dot, cos, sin), rope_ref(kn_dot, cos, sin)
    return rope_ref(qn, cos, sin), q_dot, rope_ref(kn, cos, sin), k_dot


# ---------------------------------------------------------------------------------------------
# SwiGLU MLP (no biases)
# ---------------------------------------------------------------------------------------------
def swiglu_ref(x, w1, w3, w2) -> torch.Tensor:
    """(silu(x W1ᵀ) ⊙ x W3ᵀ) W2ᵀ; w1, w3 (Hd, D), w2 (D, Hd)."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def swiglu_jvp_ref(x, w1, w3, w2, x_dot) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, ẏ); y is differentiable, ẏ carries no autograd graph (the weights are constants for ẏ)."""
    a, b = F.linear(x, w1), F.linear(x, w3)
    y = F.linear(F.silu(a) * b, w2)
    with torch.no_grad():
        dt = compute_dtype(x.dtype)
        af, bf = a.to(dt), b.to(dt)
        a_dot, b_dot = F.linear(x_dot, w1).to(dt), F.linear(x_dot, w3).to(dt)
        s = torch.sigmoid(af)
        h_dot = s * (1 + af * (1 - s)) * a_dot * bf + af * s * b_dot
        y_dot = F.linear(h_dot.to(x.dtype), w2)
    return y, y_dot


# ---------------------------------------------------------------------------------------------
# Residual with a per-channel gate (a parameter: no tangent)
# ---------------------------------------------------------------------------------------------
def channel_gated_residual_ref(x, gate, f) -> torch.Tensor:
    """x + f ⊙ g: x, f (B, N, D), g (D,)."""
    return x + f * gate


def channel_gated_residual_jvp_ref(x, gate, f, x_dot, f_dot) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, ẏ) = (x + f ⊙ g, ẋ + ḟ ⊙ g); y is differentiable, ẏ carries no autograd graph."""
    y = x + f * gate
    with torch.no_grad():
        y_dot = x_dot + f_dot * gate
    return y, y_dot
