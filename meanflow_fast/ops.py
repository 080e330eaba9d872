"""The per-op backend switch of the models' plain forward and of their dual-stream (primal + tangent) forward.

The DiT's ``forward`` is written once against a ``PrimalOps`` table and its ``forward_jvp`` once
against a ``DualOps`` table; the iMF DiT's against ``IMFOps`` and ``IMFDualOps`` (last section). The
backend picks the implementation of each op:

- ``torch``  the pure-torch references of ``meanflow_fast.kernels`` (explicit JVP rules, runs anywhere);
- ``triton`` the fused Triton kernels (CUDA, or the CPU interpreter with ``TRITON_INTERPRET=1``).

A ``DualOps`` op returns ``(y, y_dot)``: ``y`` differentiable, ``y_dot`` without an autograd graph.
A ``PrimalOps`` op returns ``y`` (differentiable).
"""
import functools
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as _forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import kernels
from .kernels.qk_norm_rope import qk_norm_rope_jvp_ref, qk_norm_rope_ref
from .kernels.rmsnorm import (channel_gated_residual_jvp_ref, channel_gated_residual_ref, gated_residual_rmsnorm_jvp_ref,
                              gated_residual_rmsnorm_ref, rms_norm_jvp_ref, rms_norm_ref)
from .kernels.swiglu import swiglu_jvp_ref, swiglu_ref

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


def _autocast_inputs(fn: Callable, keep: Tuple[int, ...] = ()) -> Callable:
    """Custom Triton ops are invisible to autocast: under CUDA autocast, cast the floating-point
    tensor arguments (fp32 master weights included) to the autocast dtype, as autocast would for a
    matmul, and run the kernel outside autocast. Gradients flow back through the casts. The positional
    arguments at ``keep`` stay as they are (constant tables the kernel reads in fp32)."""
    @functools.wraps(fn)
    def wrapped(*args):
        if not torch.is_autocast_enabled("cuda"):
            return fn(*args)
        dt = torch.get_autocast_dtype("cuda")
        args = tuple(a.to(dt) if torch.is_tensor(a) and a.is_floating_point() and a.is_cuda and i not in keep
                     else a for i, a in enumerate(args))
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


# =================================================================================================
#                 The iMF DiT's tables (meanflow_fast/imf/model.py; docs/DESIGN.md §8)
# =================================================================================================
@dataclass(frozen=True)
class IMFOps:
    """The iMF plain forward's ops: each returns y (differentiable)."""
    linear: Callable          # (x, weight, bias) -> y
    rms_norm: Callable        # (x, weight, eps) -> y
    qk_norm_rope: Callable    # (q, k, q_weight, k_weight, cos, sin, eps) -> (q', k'), layout (B, N, H, D)
    attention: Callable       # (q, k, v) -> o, layout (B, H, N, D), softmax scale 1/√D
    swiglu: Callable          # (x, w1, w3, w2) -> y
    gated_residual: Callable  # (x, gate, f) -> x + f ⊙ gate, gate (D,)
    gated_residual_rmsnorm: Callable  # (x, f, gate, weight, eps) -> (h, m): h = x + f ⊙ gate, m = rms_norm(h)


@dataclass(frozen=True)
class IMFDualOps:
    """The iMF forward_jvp's ops: each returns (y, ẏ), y differentiable, ẏ without an autograd graph."""
    linear: Callable          # (x, weight, bias, x_dot)
    rms_norm: Callable        # (x, weight, x_dot, eps)
    qk_norm_rope: Callable    # (q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps) -> (q', q̇', k', k̇')
    attention: Callable       # (q, k, v, q_dot, k_dot, v_dot)
    swiglu: Callable          # (x, w1, w3, w2, x_dot)
    gated_residual: Callable  # (x, gate, f, x_dot, f_dot)
    gated_residual_rmsnorm: Callable  # (x, f, gate, weight, x_dot, f_dot, eps) -> (h, ḣ, m, ṁ)


_IMF_TORCH_PRIMAL = IMFOps(linear=F.linear, rms_norm=rms_norm_ref, qk_norm_rope=qk_norm_rope_ref, attention=_sdpa,
                           swiglu=swiglu_ref, gated_residual=channel_gated_residual_ref,
                           gated_residual_rmsnorm=gated_residual_rmsnorm_ref)
_IMF_TORCH_DUAL = IMFDualOps(linear=kernels.linear_jvp_ref, rms_norm=rms_norm_jvp_ref,
                             qk_norm_rope=qk_norm_rope_jvp_ref, attention=kernels.attention_jvp_ref,
                             swiglu=swiglu_jvp_ref, gated_residual=channel_gated_residual_jvp_ref,
                             gated_residual_rmsnorm=gated_residual_rmsnorm_jvp_ref)
_IMF_PRIMAL_CACHE: Dict[str, IMFOps] = {"torch": _IMF_TORCH_PRIMAL}
_IMF_DUAL_CACHE: Dict[str, IMFDualOps] = {"torch": _IMF_TORCH_DUAL}


def _imf_triton_primal_ops() -> IMFOps:
    from .kernels.qk_norm_rope import qk_norm_rope
    from .kernels.rmsnorm import gated_residual_rmsnorm, rms_norm
    from .kernels.swiglu import swiglu
    # As the DiT's plain forward: the plain linears on cuBLAS and attention on torch's SDPA (primal alone,
    # ours brings nothing without the tangent stream; _triton_primal_ops). The cos/sin tables of RoPE stay
    # fp32 under autocast (the kernel takes fp32 tables with fp16/bf16 q and k).
    return IMFOps(
        linear=F.linear,
        rms_norm=_autocast_inputs(rms_norm),
        qk_norm_rope=_autocast_inputs(qk_norm_rope, keep=(4, 5)),
        attention=_sdpa,
        swiglu=_autocast_inputs(swiglu),
        gated_residual=channel_gated_residual_ref,  # unfused: a block on its own (elementwise, torch)
        gated_residual_rmsnorm=_autocast_inputs(gated_residual_rmsnorm),
    )


def _imf_triton_dual_ops() -> IMFDualOps:
    from .kernels.attention import attention_jvp
    from .kernels.linear import linear_jvp
    from .kernels.qk_norm_rope import qk_norm_rope_jvp
    from .kernels.rmsnorm import gated_residual_rmsnorm_jvp, rms_norm_jvp
    from .kernels.swiglu import swiglu_jvp
    # linear_jvp: two cuBLAS GEMMs on CUDA or the dual-stream Triton GEMM (switch plain_dual_linear in
    # kernels/config.py); SwiGLU's W2 goes the same way inside swiglu_jvp.
    return IMFDualOps(
        linear=_autocast_inputs(linear_jvp),
        rms_norm=_autocast_inputs(rms_norm_jvp),
        qk_norm_rope=_autocast_inputs(qk_norm_rope_jvp, keep=(4, 5)),
        attention=_autocast_inputs(attention_jvp),
        swiglu=_autocast_inputs(swiglu_jvp),
        gated_residual=channel_gated_residual_jvp_ref,  # unfused: a block on its own (elementwise, torch)
        gated_residual_rmsnorm=_autocast_inputs(gated_residual_rmsnorm_jvp),
    )


def get_imf_primal_ops(backend: str) -> IMFOps:
    """The iMF plain forward's op table of ``backend`` (one of ``BACKENDS``)."""
    _check_backend(backend)
    return _build(backend, _IMF_PRIMAL_CACHE, _imf_triton_primal_ops)


def get_imf_dual_ops(backend: str) -> IMFDualOps:
    """The iMF forward_jvp's op table of ``backend`` (one of ``BACKENDS``)."""
    _check_backend(backend)
    return _build(backend, _IMF_DUAL_CACHE, _imf_triton_dual_ops)
