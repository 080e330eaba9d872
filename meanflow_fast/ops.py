"""The per-op backend switch of the DiT's plain forward and of its dual-stream (primal + tangent) forward.

The DiT's ``forward`` is written once against a ``PrimalOps`` table and its ``forward_jvp`` once
against a ``DualOps`` table; the backend picks the implementation of each op:

- ``torch``  the pure-torch references of ``meanflow_fast.kernels`` (explicit JVP rules, runs anywhere);
- ``triton`` the fused Triton kernels (CUDA, or the CPU interpreter with ``TRITON_INTERPRET=1``).

A ``DualOps`` op returns ``(y, y_dot)``: ``y`` differentiable, ``y_dot`` without an autograd graph.
A ``PrimalOps`` op returns ``y`` (differentiable).
"""
import functools
from dataclasses import dataclass
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as _forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import kernels

BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class DualOps:
    linear: Callable        # (x, weight, bias, x_dot) -> (y, y_dot)
    ln_modulate: Callable   # (x, shift, scale, x_dot, shift_dot, scale_dot, eps) -> (m, m_dot)
    attention: Callable     # (qkv, qkv_dot, num_heads, scale) -> (o, o_dot): the packed (B, N, 3·H·D)
                            # projection in, (B, H, N, D) out
    mlp: Callable           # (x, w1, b1, w2, b2, x_dot) -> (y, y_dot)
    gated_residual: Callable  # (x, gate, f, x_dot, gate_dot, f_dot) -> (y, y_dot)
    gated_residual_ln: Callable  # (x, gate, f, shift, scale, x_dot, gate_dot, f_dot, shift_dot, scale_dot, eps)
                                 # -> (y, y_dot, m, m_dot): gated_residual, then ln_modulate of its output


_TORCH = DualOps(
    linear=kernels.linear_jvp_ref,
    ln_modulate=kernels.ln_modulate_jvp_ref,
    attention=kernels.attention_jvp_qkv_ref,
    mlp=kernels.mlp_jvp_ref,
    gated_residual=kernels.gated_residual_jvp_ref,
    gated_residual_ln=kernels.gated_residual_ln_jvp_ref,
)

_CACHE: Dict[str, DualOps] = {"torch": _TORCH}


@dataclass(frozen=True)
class PrimalOps:
    linear: Callable        # (x, weight, bias) -> y
    ln_modulate: Callable   # (x, shift, scale, eps) -> m
    attention: Callable     # (q, k, v) -> o, layout (B, H, N, D), softmax scale 1/√D
    mlp: Callable           # (x, w1, b1, w2, b2) -> y
    gated_residual: Callable  # (x, gate, f) -> y
    gated_residual_ln: Callable  # (x, gate, f, shift, scale, eps) -> (y, m): gated_residual, then ln_modulate


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # The fused SDPA kernels (flash, memory-efficient, CPU flash) have no forward-AD rule: under forward AD
    # (torch.func.jvp, forward_ad.dual_level) take the math path, which has one; one global read otherwise.
    if _forward_ad._current_level >= 0:
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


_TORCH_PRIMAL = PrimalOps(
    linear=kernels.linear_ref,
    ln_modulate=kernels.ln_modulate_ref,
    attention=_sdpa,
    mlp=kernels.mlp_ref,
    gated_residual=kernels.gated_residual_ref,
    gated_residual_ln=kernels.gated_residual_ln_ref,
)

_PRIMAL_CACHE: Dict[str, PrimalOps] = {"torch": _TORCH_PRIMAL}


def _autocast_inputs(fn: Callable) -> Callable:
    """Custom Triton ops are invisible to autocast: under CUDA autocast, cast the floating-point
    tensor arguments (fp32 master weights included) to the autocast dtype, as autocast would for a
    matmul, and run the kernel outside autocast. Gradients flow back through the casts."""
    @functools.wraps(fn)
    def wrapped(*args):
        if not torch.is_autocast_enabled("cuda"):
            return fn(*args)
        dt = torch.get_autocast_dtype("cuda")
        args = tuple(a.to(dt) if torch.is_tensor(a) and a.is_floating_point() and a.is_cuda else a for a in args)
        with torch.autocast("cuda", enabled=False):
            return fn(*args)
    return wrapped


def _triton_ops() -> DualOps:
    from .kernels.attention import attention_jvp_qkv
    from .kernels.gated_residual import gated_residual_jvp
    from .kernels.gated_residual_ln import gated_residual_ln_jvp
    from .kernels.layernorm_modulate import ln_modulate_jvp
    from .kernels.linear import linear_jvp
    from .kernels.mlp import mlp_jvp
    return DualOps(*(_autocast_inputs(f) for f in (linear_jvp, ln_modulate_jvp, attention_jvp_qkv, mlp_jvp,
                                                    gated_residual_jvp, gated_residual_ln_jvp)))


def _triton_primal_ops() -> PrimalOps:
    from .kernels.gated_residual import gated_residual
    from .kernels.gated_residual_ln import gated_residual_ln
    from .kernels.layernorm_modulate import ln_modulate
    from .kernels.mlp import mlp
    # The plain linears (qkv, proj, final layer) stay on cuBLAS: with no tangent stream sharing the
    # weight tile and no epilogue to fuse, a Triton GEMM would at best match it. fc1 + GELU is fused
    # inside ``mlp`` (fc2 is cuBLAS there too).
    # Attention stays on torch's SDPA (FlashAttention-2, or cuDNN/FA3 where torch picks it): for the
    # primal alone it is the stronger kernel; ours (meanflow_fast/kernels/attention.py) is built around
    # the tangent stream (three extra accumulators per query block) and brings nothing without it.
    return PrimalOps(
        linear=F.linear,
        ln_modulate=_autocast_inputs(ln_modulate),
        attention=_sdpa,
        mlp=_autocast_inputs(mlp),
        gated_residual=_autocast_inputs(gated_residual),
        gated_residual_ln=_autocast_inputs(gated_residual_ln),
    )


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _build(backend: str, cache: Dict, factory: Callable):
    if backend not in cache:
        try:
            cache[backend] = factory()
        except ImportError as e:
            raise ValueError(
                f"backend='triton' is not available: {e}. Install triton, or use backend='torch'."
            ) from e
    return cache[backend]


def get_dual_ops(backend: str) -> DualOps:
    """The dual-stream op table of ``backend`` (one of ``BACKENDS``), for ``forward_jvp``."""
    _check_backend(backend)
    return _build(backend, _CACHE, _triton_ops)


def get_primal_ops(backend: str) -> PrimalOps:
    """The primal-only op table of ``backend`` (one of ``BACKENDS``), for the plain ``forward``."""
    _check_backend(backend)
    return _build(backend, _PRIMAL_CACHE, _triton_primal_ops)
