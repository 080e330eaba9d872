"""Dual-stream linear: o = x Wᵀ + b and ȯ = ẋ Wᵀ, the weight read once for both streams.

The same kernel with HAS_TANGENT=False and the GELU epilogue is the fc1 of the primal-only MLP
(``kernels.mlp.mlp``, the DiT's plain forward): h = gelu(x W1ᵀ + b1) in one pass instead of a GEMM
and an elementwise GELU over the (M, 4D) activations. A plain primal linear without an epilogue has
nothing to fuse and stays on cuBLAS (``F.linear``): a Triton GEMM would at best match it. On CUDA the
dual launch without an epilogue goes to cuBLAS too (switch ``plain_dual_linear``, reason beside ``_IMPLS``);
the kernel then serves fc1 (GELU epilogue, both streams), the CPU interpreter, and ``impl="triton"``.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import config
from .launch import KernelFunction, backward_once, check_no_bf16_dot_on_cpu, check_shape, check_tensors, kernel_op, rows


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


# ---------------------------------------------------------------------------------------------
# Triton kernel: dual-stream matmul (o = x Wᵀ + b, ȯ = ẋ Wᵀ), optional GELU (tanh) epilogue
# ---------------------------------------------------------------------------------------------
# One kernel for both streams because they share the weight: each (BLOCK_K, BLOCK_N) tile of Wᵀ feeds
# two tl.dot calls, so a 64-row dual tile has a 128-row plain tile's arithmetic intensity and the weight
# is read half as often as by two matmuls.
@triton.jit
def gelu_tanh_and_grad(a):
    """(gelu(a), gelu'(a)) in fp32 for fp32 a: the GELU epilogue of fc1 (docs/DESIGN.md, JVP rules: GELU
    MLP). With u = √(2/π)·(a + 0.044715·a³), 0.5·(1 + tanh u) = σ(2u) and 1 − tanh²u = 4σ(2u)(1 − σ(2u)):

        h = gelu(a) = a·σ(2u),   gelu'(a) = σ(2u) + 2a·σ(2u)(1 − σ(2u))·√(2/π)·(1 + 3·0.044715·a²)

    σ is written with e = exp(−2u): σ = 1/(1 + e) and σ(1 − σ) = e·σ², which avoids the cancellation of
    1 − σ for large a (that put gelu' at 2.3× torch's fp32 error). The exp argument is clamped at 80
    (exp(80) ≈ 5.5e34 < fp32 max): a very negative a gives σ ≈ 1.8e-35 instead of an inf intermediate."""
    inner = a * (1.0 + 0.044715 * a * a)
    e = tl.exp(tl.minimum(-2.0 * 0.7978845608028654 * inner, 80.0))  # exp(−2u), √(2/π) = 0.79788…
    s = 1.0 / (1.0 + e)  # σ(2u)
    grad = s + 2.0 * a * (e * s * s) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * a * a)  # e·σ² ≤ 1/4 first:
    # 2a·e alone would overflow fp32 for a ≲ −3·10³ (e clamped at 5.5e34)
    return a * s, grad


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(rows, columns), int64, of this program's (BLOCK_M, BLOCK_N) output tile of an (M, N) GEMM. Program
    order: GROUP_M row-blocks walk down one column of output tiles before moving right, so the weight
    tiles of a column stay in L2 while GROUP_M row-blocks use them. int64: M·K may exceed 2³¹."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    group_first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - group_first_m, GROUP_M)
    pid_m = group_first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    return rm, rn


@triton.jit
def _dual_linear_fwd_kernel(
    X,              # (M, K) primal rows, any strides
    XD,             # (M, K) tangent rows, any strides (not read when HAS_TANGENT is False)
    W,              # (N, K) weight, any strides; one tile serves both streams
    BIAS,           # (N,) bias, primal stream only; not read when HAS_BIAS is False
    Y,              # (M, N) out: primal (gelu(a) when GELU), contiguous
    YD,             # (M, N) out: tangent (gelu'(a)·ȧ when GELU), contiguous; not written when HAS_TANGENT
                    # is False
    PRE,            # (M, N) out: pre-activation a = x Wᵀ + b for the backward; written iff STORE_PRE
    M, N, K,        # problem size: rows, output features, input features
    stride_xm, stride_xk,    # strides of X
    stride_xdm, stride_xdk,  # strides of XD
    stride_wn, stride_wk,    # strides of W
    stride_bn,               # stride of BIAS
    HAS_BIAS: tl.constexpr,         # add BIAS to the primal stream
    HAS_TANGENT: tl.constexpr,      # False: primal stream only (one accumulator, one tl.dot per step)
    GELU: tl.constexpr,             # apply the GELU (tanh) epilogue to both streams
    STORE_PRE: tl.constexpr,        # write PRE (only when GELU and a backward will need it)
    INPUT_PRECISION: tl.constexpr,  # tl.dot input precision for fp32 inputs: "ieee" or "tf32"
    BLOCK_M: tl.constexpr,          # rows per program (per stream)
    BLOCK_N: tl.constexpr,          # output features per program
    BLOCK_K: tl.constexpr,          # reduction step
    GROUP_M: tl.constexpr,          # row-blocks per group in the L2-friendly program order
):
    rm, rn = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    m_mask = rm < M
    n_mask = rn < N

    x_ptrs = X + rm[:, None] * stride_xm + rk[None, :] * stride_xk
    xd_ptrs = XD + rm[:, None] * stride_xdm + rk[None, :] * stride_xdk
    w_ptrs = W + rn[None, :] * stride_wn + rk[:, None] * stride_wk  # a (BLOCK_K, BLOCK_N) tile of Wᵀ

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # unused (compiled out) without the tangent
    for k0 in range(0, K, BLOCK_K):
        k_mask = (rk + k0) < K
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        if HAS_TANGENT:
            xd = tl.load(xd_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            acc_d = tl.dot(xd, w, acc_d, input_precision=INPUT_PRECISION)
            xd_ptrs += BLOCK_K * stride_xdk
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        b = tl.load(BIAS + rn * stride_bn, mask=n_mask, other=0.0).to(tl.float32)
        acc += b[None, :]

    out_offs = rm[:, None] * N + rn[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if GELU:
        if STORE_PRE:
            tl.store(PRE + out_offs, acc.to(PRE.dtype.element_ty), mask=out_mask)
        h, dh = gelu_tanh_and_grad(acc)  # without the tangent, dh is dead code (eliminated)
        if HAS_TANGENT:
            acc_d = dh * acc_d
        acc = h
    tl.store(Y + out_offs, acc.to(Y.dtype.element_ty), mask=out_mask)
    if HAS_TANGENT:
        tl.store(YD + out_offs, acc_d.to(YD.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
# CUDA: autotuned over these configs, sized for two fp32 accumulators; ``_prune_configs`` drops per launch
# what spills or overflows shared memory (benchmarks/tools/compile_check.py, docs/TUNING.md). The
# interpreter takes one fixed config: its programs run one after another, so few, large ones are faster.
_CUDA_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
]
CPU_GEMM_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4}
_tuned_kernel = None  # built on first CUDA use, so the CPU path never touches the autotuner


def _prune_configs(configs, named_args, **kwargs):
    """``early_config_prune`` of the CUDA autotuner: the subset of ``configs`` worth compiling for this
    launch. fp32 (IEEE or TF32 dots): only 64×64 tiles fit the shared memory of sm_80/sm_90. A dual
    launch holds two accumulators: no 128×256 tile, and with the GELU epilogue no 128×128 (both spill)."""
    if named_args["X"].dtype == torch.float32:
        configs = [c for c in configs if c.kwargs["BLOCK_M"] == 64 and c.kwargs["BLOCK_N"] == 64]
    if kwargs.get("HAS_TANGENT", True):
        configs = [c for c in configs if not (c.kwargs["BLOCK_M"] == 128 and c.kwargs["BLOCK_N"] == 256)]
        if kwargs.get("GELU"):
            configs = [c for c in configs if not (c.kwargs["BLOCK_M"] == 128 and c.kwargs["BLOCK_N"] == 128)]
    return configs


def _cuda_kernel():
    global _tuned_kernel
    if _tuned_kernel is None:
        # GELU and HAS_TANGENT in the key: the pruned lists differ with them, so a GELU or a primal-only
        # launch must not reuse the choice of another launch of the same (M, N, K).
        _tuned_kernel = triton.autotune(configs=_CUDA_CONFIGS, key=["M", "N", "K", "GELU", "HAS_TANGENT"],
                                        prune_configs_by={"early_config_prune": _prune_configs}
                                        )(_dual_linear_fwd_kernel)
    return _tuned_kernel


def input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul setting: TF32 only where torch would use it too
    (torch.set_float32_matmul_precision("high"/"medium")); fp16/bf16 ignore the flag."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _op_name(gelu: bool, has_tangent: bool) -> str:
    """The public op a launch serves, for error messages."""
    if gelu:
        return "mlp_jvp (fc1)" if has_tangent else "mlp (fc1)"
    return "linear_jvp" if has_tangent else "linear (triton)"


def _check_dual_linear(op: str, x, weight, bias, x_dot) -> None:
    dtype = check_tensors(op, {"x": x, "weight": weight, "bias": bias, "x_dot": x_dot})
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: x must have shape (..., in_features={weight.shape[1]}) to match weight "
                         f"{tuple(weight.shape)}, got {tuple(x.shape)}")
    if x_dot is not None:
        check_shape(op, "x_dot", x_dot, x.shape, "the tangent of x has x's shape")
    if bias is not None:
        check_shape(op, "bias", bias, (weight.shape[0],), "out_features of weight")
    check_no_bf16_dot_on_cpu(op, dtype, x.device)


# Who runs a dual launch without the GELU epilogue (qkv, proj, fc2, the final linear) on CUDA: cuBLAS ran
# these GEMMs at 680-760 TFLOP/s, the dual Triton GEMM at ~474 (H100, docs/TUNING.md), and with no epilogue
# the shared weight tile saves nothing L2 does not hold. fc1 keeps the kernel for its GELU epilogue.
_IMPLS = ("triton", "cublas")


def dual_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    x_dot: Optional[torch.Tensor], gelu: bool = False, store_pre: bool = False,
                    impl: Optional[str] = None,
                    check: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Launch the dual-stream matmul; returns (y, y_dot, pre), all (..., out_features) in x's dtype.

    Without ``gelu``: y = x Wᵀ + b, y_dot = ẋ Wᵀ. With ``gelu``: y = gelu(a), y_dot = gelu'(a)·ȧ for
    a = x Wᵀ + b, and ``pre`` = a when ``store_pre`` (an empty tensor otherwise). ``x_dot=None`` runs the
    primal stream alone (HAS_TANGENT=False) and returns y_dot = None. Inputs of any strides are read in
    place; (..., K) is viewed as rows with ``reshape`` (a copy only if the leading dims cannot be
    merged). Outputs are contiguous.

    ``impl`` picks who computes a launch without ``gelu``: ``"triton"`` (the fused kernel) or
    ``"cublas"`` (``F.linear`` per stream: cuBLAS on CUDA, torch's own matmul on the CPU); the default,
    None, is the switch ``plain_dual_linear`` (config.py) on CUDA and the Triton kernel elsewhere. A
    ``gelu`` launch always runs the Triton kernel. ``check=False``: the caller has validated the inputs.
    """
    has_tangent = x_dot is not None
    if check:
        _check_dual_linear(_op_name(gelu, has_tangent), x, weight, bias, x_dot)
        if impl is not None and impl not in _IMPLS:
            raise ValueError(f"dual_linear_fwd: impl must be one of {_IMPLS} or None, got {impl!r}")
        if gelu and impl == "cublas":
            raise ValueError("dual_linear_fwd: impl='cublas' has no GELU epilogue; the gelu launch runs the "
                             "Triton kernel (impl=None or 'triton')")
    if impl is None:
        impl = config.get("plain_dual_linear") if (x.is_cuda and not gelu) else "triton"
    if impl == "cublas":
        return (F.linear(x, weight, bias), F.linear(x_dot, weight) if has_tangent else None,
                x.new_empty(0))
    n_out, k = weight.shape
    lead = x.shape[:-1]
    x2 = rows(x, k)
    xd2 = rows(x_dot, k) if has_tangent else x2  # x2: never read (HAS_TANGENT=False)
    m = x2.shape[0]
    y = torch.empty(*lead, n_out, dtype=x.dtype, device=x.device)
    y_dot = torch.empty_like(y) if has_tangent else None
    pre = torch.empty_like(y) if (gelu and store_pre) else x.new_empty(0)
    if m == 0 or n_out == 0:
        return y, y_dot, pre
    # (K = 0 needs no special case: the reduction loop runs zero times and the products are zero.)
    args = (x2, xd2, weight, bias if bias is not None else x2, y, y_dot if has_tangent else y,
            pre if pre.numel() else y,
            m, n_out, k,
            x2.stride(0), x2.stride(1), xd2.stride(0), xd2.stride(1), weight.stride(0), weight.stride(1),
            bias.stride(0) if bias is not None else 0)
    flags = dict(HAS_BIAS=bias is not None, HAS_TANGENT=has_tangent, GELU=bool(gelu),
                 STORE_PRE=bool(gelu and store_pre), INPUT_PRECISION=input_precision(x.dtype))
    if x.is_cuda:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)  # noqa: E731
        with torch.cuda.device(x.device):
            _cuda_kernel()[grid](*args, **flags)
    else:
        c = CPU_GEMM_CONFIG
        grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n_out, c["BLOCK_N"]),)
        _dual_linear_fwd_kernel[grid](*args, **flags, **c)
    return y, y_dot, pre


# torch.library custom op: torch.compile treats the launch as one opaque node (it cannot trace into a
# Triton launch that runs in the interpreter, and need not on CUDA); register_fake gives it shapes.
@kernel_op("meanflow_fast::dual_linear_fwd")
def dual_linear_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], x_dot: torch.Tensor,
                       gelu: bool, store_pre: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dual_linear_fwd(x, weight, bias, x_dot, gelu, store_pre, check=False)


@dual_linear_fwd_op.register_fake
def _dual_linear_fwd_fake(x, weight, bias, x_dot, gelu, store_pre):
    _check_dual_linear(_op_name(gelu, True), x, weight, bias, x_dot)
    y = x.new_empty(*x.shape[:-1], weight.shape[0])
    return y, torch.empty_like(y), (torch.empty_like(y) if (gelu and store_pre) else x.new_empty(0))


@kernel_op("meanflow_fast::linear_gelu_fwd")
def linear_gelu_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], store_pre: bool
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Primal only: (gelu(a), a or an empty tensor) for a = x Wᵀ + b (fc1 of ``kernels.mlp.mlp``)."""
    h, _, pre = dual_linear_fwd(x, weight, bias, None, gelu=True, store_pre=store_pre, check=False)
    return h, pre


@linear_gelu_fwd_op.register_fake
def _linear_gelu_fwd_fake(x, weight, bias, store_pre):
    _check_dual_linear(_op_name(True, False), x, weight, bias, None)
    h = x.new_empty(*x.shape[:-1], weight.shape[0])
    return h, (torch.empty_like(h) if store_pre else x.new_empty(0))


# ---------------------------------------------------------------------------------------------
# autograd.Function
# ---------------------------------------------------------------------------------------------
class LinearJvpFunction(KernelFunction):
    """(x, W, b, ẋ) → (x Wᵀ + b, ẋ Wᵀ). Backward runs through the primal only (docs/DESIGN.md, Backward):
    the tangent output is marked non-differentiable and nothing of the tangent stream is saved."""

    @staticmethod
    def forward(x, weight, bias, x_dot):
        return dual_linear_fwd_op(x, weight, bias, x_dot, False, False)[:2]

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, _ = inputs
        ctx.save_for_backward(x, weight)  # x itself, not its row view: a reshape copy must not live on
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(output[1])  # ẏ
        ctx.set_materialize_grads(False)  # no zero-filled gradient for ẏ

    @staticmethod
    @backward_once
    def backward(ctx, dy, _dy_dot):
        # The plain linear backward: three GEMMs with nothing to fuse (no tangent stream, no epilogue),
        # which cuBLAS runs at the roofline.
        if dy is None:  # y took no part in the loss
            return None, None, None, None
        x, weight = ctx.saved_tensors
        n_out, k = weight.shape
        dy2 = rows(dy, n_out)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ weight).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            dw = dy2.t() @ rows(x, k)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db, None


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
def linear_jvp(x, weight, bias, x_dot) -> Tuple[torch.Tensor, torch.Tensor]:
    """(o, ȯ) = (x Wᵀ + b, ẋ Wᵀ): on CUDA two cuBLAS GEMMs by default (switch ``plain_dual_linear``;
    "triton" for the fused kernel), in the CPU interpreter the Triton kernel. o is differentiable, ȯ
    carries no autograd graph. Same signature and contract as ``linear_jvp_ref``; fp32/fp16/bf16, CUDA
    or the CPU interpreter."""
    if x_dot is None:
        raise ValueError("linear_jvp: x_dot must be a tensor (the tangent of x; zeros for a constant x); for the "
                         "primal alone use F.linear")
    _check_dual_linear("linear_jvp", x, weight, bias, x_dot)
    return LinearJvpFunction.apply(x, weight, bias, x_dot)
