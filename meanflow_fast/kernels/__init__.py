"""Triton kernels that run a DiT or iMF op forward together with its tangent (JVP).

Each op module holds one op, in one order: the pure-torch reference, the Triton kernel(s), their
launcher, an ``autograd.Function`` whose backward runs through the primal only, and the public
function (docs/DESIGN.md, Kernel conventions). The references ``<op>_ref``/``<op>_jvp_ref`` (the same
math in pure torch) serve the tests, the benchmarks and the models' ``torch`` backends. Shared helpers:
``launch`` (launching, validation, autograd plumbing), ``rownorm`` (LayerNorm rows), ``reference``,
``config`` (the implementation switches), ``precompile`` (parallel cold-start compilation).

The ``*_jvp`` functions share one contract::

    y, y_dot = op_jvp(primals..., tangents...)

``y`` is differentiable with respect to the primal inputs and parameters; ``y_dot`` carries no
autograd graph (``gated_residual_ln_jvp``, the gated residual fused with the next LayerNorm-modulate,
returns two such pairs: ``y, y_dot, m, m_dot``). MeanFlow puts du/dt inside a stop-gradient, so
backward never needs the tangent stream and nothing of it is kept alive.

Every Function derives from ``launch.KernelFunction`` (the torch.func form, without torch's
per-call argument binding) and wraps its backward in ``launch.backward_once``: reverse mode works
with plain autograd, torch.compile and one torch.func transform (``grad``, ``vjp``); the backward itself
is not differentiable (a second derivative raises instead of dropping the kernels' share).
"""
from .attention import attention_ref, attention_jvp_ref, attention_jvp_qkv_ref, split_qkv
from .layernorm_modulate import ln_modulate_ref, ln_modulate_jvp_ref
from .gated_residual import gated_residual_ref, gated_residual_jvp_ref
from .gated_residual_ln import gated_residual_ln_ref, gated_residual_ln_jvp_ref
from .linear import linear_ref, linear_jvp_ref
from .mlp import gelu_tanh, gelu_tanh_grad, mlp_ref, mlp_jvp_ref
from .rmsnorm import (channel_gated_residual_ref, channel_gated_residual_jvp_ref, gated_residual_rmsnorm_ref,
                      gated_residual_rmsnorm_jvp_ref, rms_norm_ref, rms_norm_jvp_ref)
from .qk_norm_rope import qk_norm_rope_ref, qk_norm_rope_jvp_ref, rope_cos_sin, rope_ref
from .swiglu import swiglu_ref, swiglu_jvp_ref

__all__ = [
    "attention_ref", "attention_jvp_ref", "attention_jvp_qkv_ref", "split_qkv",
    "ln_modulate_ref", "ln_modulate_jvp_ref",
    "gated_residual_ref", "gated_residual_jvp_ref",
    "gated_residual_ln_ref", "gated_residual_ln_jvp_ref",
    "linear_ref", "linear_jvp_ref",
    "gelu_tanh", "gelu_tanh_grad", "mlp_ref", "mlp_jvp_ref",
    "rms_norm_ref", "rms_norm_jvp_ref", "channel_gated_residual_ref", "channel_gated_residual_jvp_ref",
    "gated_residual_rmsnorm_ref", "gated_residual_rmsnorm_jvp_ref",
    "qk_norm_rope_ref", "qk_norm_rope_jvp_ref", "rope_cos_sin", "rope_ref",
    "swiglu_ref", "swiglu_jvp_ref",
]
