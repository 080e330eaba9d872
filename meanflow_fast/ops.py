"""The per-op backend switch of the dual-stream (primal + tangent) forward.

The DiT's ``forward_jvp`` is written once against a ``DualOps`` table; the backend picks the
implementation of each op:

- ``torch``  the pure-torch references of ``kernels/`` (explicit JVP rules, runs anywhere);
- ``triton`` the fused Triton kernels (CUDA, or the CPU interpreter with ``TRITON_INTERPRET=1``).

Every op returns ``(y, y_dot)``: ``y`` differentiable, ``y_dot`` without an autograd graph.
"""
import functools
from dataclasses import dataclass
from typing import Callable, Dict

import torch

import kernels

BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class DualOps:
    linear: Callable        # (x, weight, bias, x_dot) -> (y, y_dot)
    ln_modulate: Callable   # (x, shift, scale, x_dot, shift_dot, scale_dot, eps) -> (m, m_dot)
    attention: Callable     # (q, k, v, q_dot, k_dot, v_dot, scale) -> (o, o_dot), layout (B, H, N, D)
    mlp: Callable           # (x, w1, b1, w2, b2, x_dot) -> (y, y_dot)
    gated_residual: Callable  # (x, gate, f, x_dot, gate_dot, f_dot) -> (y, y_dot)


_TORCH = DualOps(
    linear=kernels.linear_jvp_ref,
    ln_modulate=kernels.ln_modulate_jvp_ref,
    attention=kernels.attention_jvp_ref,
    mlp=kernels.mlp_jvp_ref,
    gated_residual=kernels.gated_residual_jvp_ref,
)

_CACHE: Dict[str, DualOps] = {"torch": _TORCH}


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
    from kernels.attention import attention_jvp
    from kernels.gated_residual import gated_residual_jvp
    from kernels.layernorm_modulate import ln_modulate_jvp
    from kernels.linear import linear_jvp
    from kernels.mlp import mlp_jvp
    return DualOps(*(_autocast_inputs(f) for f in (linear_jvp, ln_modulate_jvp, attention_jvp, mlp_jvp,
                                                    gated_residual_jvp)))


def get_dual_ops(backend: str) -> DualOps:
    """The op table of ``backend`` (one of ``BACKENDS``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend not in _CACHE:
        try:
            _CACHE[backend] = _triton_ops()
        except ImportError as e:
            raise ValueError(
                f"backend='triton' is not available: {e}. Install triton, or use backend='torch'."
            ) from e
    return _CACHE[backend]
