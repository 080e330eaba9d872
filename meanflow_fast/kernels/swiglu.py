"""SwiGLU MLP of the iMF block with its tangent (docs/DESIGN.md, "JVP rules of the iMF ops", SwiGLU; the math
is ``swiglu_ref`` / ``swiglu_jvp_ref``):

    a = x W1ᵀ,  b = x W3ᵀ,  g = silu(a) ⊙ b,  y = g W2ᵀ                       (no biases)
    ȧ = ẋ W1ᵀ,  ḃ = ẋ W3ᵀ,  ġ = silu'(a) ⊙ ȧ ⊙ b + silu(a) ⊙ ḃ,  ẏ = ġ W2ᵀ

The Triton path is two launches. The gate kernel computes the gate and up projections together: each K
step loads the x and ẋ tiles once and feeds them to both weights (four fp32 accumulators a, b, ȧ, ḃ;
two, a and b, in the primal-only form), and the epilogue writes g and ġ (and a, b when a backward
follows). W2 is then linear.py's dual-stream matmul on (g, ġ) (cuBLAS per stream on CUDA, switch
``plain_dual_linear``), or cuBLAS (``F.linear``) for the primal alone, as the DiT MLP's fc2.

Backward runs through the primal only, from the saved x, a, b (``_swiglu_backward``), as the DiT MLP's:
torch GEMMs (cuBLAS on CUDA: dg = dy W2, dW2 = dyᵀ g, dx = da W1 + db W3, dW1 = daᵀ x, dW3 = dbᵀ x) and
one Triton elementwise pass (``swiglu_bwd``) that reads dg, a, b once and writes da = dg ⊙ b ⊙ silu'(a),
db = dg ⊙ silu(a) and the g = silu(a) ⊙ b that dW2 needs (recomputed: the forward keeps a and b alone).
"""
from typing import Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .launch import (KernelFunction, backward_once, check_no_bf16_dot_on_cpu, check_shape, check_tensors,
                     elementwise_row_launch, jvp_function, kernel_op, pick_function, rows, zeros_if_none)
from .linear import CPU_GEMM_CONFIG, dual_linear_fwd_op, grouped_tile, input_precision
from .reference import compute_dtype
from .rownorm import prog_rows

__all__ = ["swiglu", "swiglu_jvp", "swiglu_ref", "swiglu_jvp_ref"]


# ---------------------------------------------------------------------------------------------
# Reference (pure torch)
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
# Triton kernel: gate and up projections on one input tile, SiLU-gated product in the epilogue
# ---------------------------------------------------------------------------------------------
@triton.jit
def silu_and_grad(a):
    """(silu(a), silu'(a)) in fp32 for fp32 a: silu(a) = a·σ(a), silu'(a) = σ(a)·(1 + a·(1 − σ(a))).
    σ and 1 − σ both come from e = exp(−|a|) ≤ 1 (σ = 1/(1 + e) for a ≥ 0, e/(1 + e) below): no overflow
    for any a and no cancellation in 1 − σ."""
    e = tl.exp(-tl.abs(a))
    r = 1.0 / (1.0 + e)
    pos = a >= 0
    s = tl.where(pos, r, e * r)        # σ(a)
    s_c = tl.where(pos, e * r, r)      # 1 − σ(a)
    return a * s, s * (1.0 + a * s_c)


@triton.jit
def _swiglu_gate_kernel(
    X,              # (M, K) primal rows, any strides
    XD,             # (M, K) tangent rows, any strides (not read when HAS_TANGENT is False)
    W1,             # (N, K) gate weight, any strides
    W3,             # (N, K) up weight, any strides
    G,              # (M, N) out: g = silu(a) ⊙ b, contiguous
    GD,             # (M, N) out: ġ, contiguous; not written when HAS_TANGENT is False
    A,              # (M, N) out: a = x W1ᵀ for the backward; written iff STORE_AB
    B,              # (M, N) out: b = x W3ᵀ for the backward; written iff STORE_AB
    M, N, K,        # problem size: rows, hidden features, input features
    stride_xm, stride_xk,    # strides of X
    stride_xdm, stride_xdk,  # strides of XD
    stride_w1n, stride_w1k,  # strides of W1
    stride_w3n, stride_w3k,  # strides of W3
    HAS_TANGENT: tl.constexpr,      # False: primal stream only (two accumulators, two tl.dot per step)
    STORE_AB: tl.constexpr,         # write A and B (only when a backward will need them)
    INPUT_PRECISION: tl.constexpr,  # tl.dot input precision for fp32 inputs: "ieee" or "tf32"
    BLOCK_M: tl.constexpr,          # rows per program (per stream)
    BLOCK_N: tl.constexpr,          # hidden features per program
    BLOCK_K: tl.constexpr,          # reduction step
    GROUP_M: tl.constexpr,          # row-blocks per group in the L2-friendly program order
):
    rm, rn = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    m_mask = rm < M
    n_mask = rn < N

    x_ptrs = X + rm[:, None] * stride_xm + rk[None, :] * stride_xk
    xd_ptrs = XD + rm[:, None] * stride_xdm + rk[None, :] * stride_xdk
    w1_ptrs = W1 + rn[None, :] * stride_w1n + rk[:, None] * stride_w1k  # a (BLOCK_K, BLOCK_N) tile of W1ᵀ
    w3_ptrs = W3 + rn[None, :] * stride_w3n + rk[:, None] * stride_w3k

    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_ad = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # unused (compiled out) without the tangent
    acc_bd = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (rk + k0) < K
        w_mask = k_mask[:, None] & n_mask[None, :]
        x_mask = m_mask[:, None] & k_mask[None, :]
        w1 = tl.load(w1_ptrs, mask=w_mask, other=0.0)
        w3 = tl.load(w3_ptrs, mask=w_mask, other=0.0)
        x = tl.load(x_ptrs, mask=x_mask, other=0.0)  # one x tile for both projections
        acc_a = tl.dot(x, w1, acc_a, input_precision=INPUT_PRECISION)
        acc_b = tl.dot(x, w3, acc_b, input_precision=INPUT_PRECISION)
        if HAS_TANGENT:
            xd = tl.load(xd_ptrs, mask=x_mask, other=0.0)
            acc_ad = tl.dot(xd, w1, acc_ad, input_precision=INPUT_PRECISION)
            acc_bd = tl.dot(xd, w3, acc_bd, input_precision=INPUT_PRECISION)
            xd_ptrs += BLOCK_K * stride_xdk
        x_ptrs += BLOCK_K * stride_xk
        w1_ptrs += BLOCK_K * stride_w1k
        w3_ptrs += BLOCK_K * stride_w3k

    out_offs = rm[:, None] * N + rn[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if STORE_AB:
        tl.store(A + out_offs, acc_a.to(A.dtype.element_ty), mask=out_mask)
        tl.store(B + out_offs, acc_b.to(B.dtype.element_ty), mask=out_mask)
    silu, dsilu = silu_and_grad(acc_a)  # without the tangent, dsilu is dead code (eliminated)
    tl.store(G + out_offs, (silu * acc_b).to(G.dtype.element_ty), mask=out_mask)
    if HAS_TANGENT:
        g_dot = dsilu * acc_ad * acc_b + silu * acc_bd
        tl.store(GD + out_offs, g_dot.to(GD.dtype.element_ty), mask=out_mask)


@triton.jit
def _swiglu_bwd_kernel(
    DG,             # (M, N) gradient of g = silu(a) ⊙ b, any strides
    A,              # (M, N) saved gate pre-activation a, any strides
    B,              # (M, N) saved up projection b, any strides
    DA,             # (M, N) out: dg ⊙ b ⊙ silu'(a), contiguous
    DB,             # (M, N) out: dg ⊙ silu(a), contiguous
    G,              # (M, N) out: silu(a) ⊙ b, contiguous
    M,              # rows
    N,              # hidden features per row
    stride_dgm, stride_dgn,      # strides of DG
    stride_am, stride_an,        # strides of A
    stride_bm, stride_bn,        # strides of B
    ROWS_PER_PROG: tl.constexpr, # rows per program (a multiple of BLOCK_R)
    BLOCK_R: tl.constexpr,       # rows per step of the row loop
    BLOCK_N: tl.constexpr,       # features per program
):
    # Grid (cdiv(M, ROWS_PER_PROG), cdiv(N, BLOCK_N)), as mlp.py's GELU pass (without its column sums).
    p = tl.program_id(0).to(tl.int64)
    col = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    c_mask = col < N
    for r0 in range(0, ROWS_PER_PROG, BLOCK_R):
        row, _, mask = prog_rows(p, r0, M, c_mask, ROWS_PER_PROG, BLOCK_R)
        dg = tl.load(DG + row[:, None] * stride_dgm + col[None, :] * stride_dgn, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(A + row[:, None] * stride_am + col[None, :] * stride_an, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + row[:, None] * stride_bm + col[None, :] * stride_bn, mask=mask, other=0.0).to(tl.float32)
        silu, dsilu = silu_and_grad(a)
        out = row[:, None] * N + col[None, :]
        tl.store(DA + out, (dg * b * dsilu).to(DA.dtype.element_ty), mask=mask)
        tl.store(DB + out, (dg * silu).to(DB.dtype.element_ty), mask=mask)
        tl.store(G + out, (silu * b).to(G.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
# CUDA: autotuned over these configs; ``_prune_configs`` drops per launch what holds too many fp32
# accumulator values per thread or overflows shared memory. Both differ from linear.py's: four fp32
# accumulators and two weight tiles per step instead of two and one (no 256-wide tile; 128 × 64 at 8
# warps). The interpreter takes linear.py's fixed config (``CPU_GEMM_CONFIG``: few, large programs).
_CUDA_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3),
]
# Limits of the pruning: fp32 accumulator values per thread (4 fp32 accumulators of 64 × 64 at 4 warps:
# 128 registers, half the 255 a thread may hold) and pipelined tile bytes (A100's 164 KiB per block).
_MAX_ACC_PER_THREAD = 128
_MAX_SHARED_BYTES = 160 * 1024
_tuned_kernel = None  # built on first CUDA use, so the CPU path never touches the autotuner


def _prune_configs(configs, named_args, **kwargs):
    """``early_config_prune``: keep the configs whose accumulators (4 with the tangent, 2 without) fit
    ``_MAX_ACC_PER_THREAD`` fp32 values per thread and whose pipelined tiles (x, ẋ, W1ᵀ, W3ᵀ per stage)
    fit ``_MAX_SHARED_BYTES``; the smallest config if none does."""
    streams = 2 if kwargs.get("HAS_TANGENT", True) else 1
    elem = named_args["X"].dtype.itemsize

    def fits(c):
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        acc = 2 * streams * bm * bn // (32 * c.num_warps)
        smem = c.num_stages * (streams * bm * bk + 2 * bk * bn) * elem
        return acc <= _MAX_ACC_PER_THREAD and smem <= _MAX_SHARED_BYTES
    kept = [c for c in configs if fits(c)]
    return kept or [configs[-1]]


def _cuda_kernel():
    global _tuned_kernel
    if _tuned_kernel is None:
        # HAS_TANGENT in the key: its pruned list differs, so a primal-only launch must not reuse the
        # choice of a dual launch of the same (M, N, K).
        _tuned_kernel = triton.autotune(configs=_CUDA_CONFIGS, key=["M", "N", "K", "HAS_TANGENT"],
                                        prune_configs_by={"early_config_prune": _prune_configs},
                                        cache_results=True)(_swiglu_gate_kernel)
    return _tuned_kernel


def _check_swiglu(op: str, x, w1, w3, w2, x_dot) -> None:
    """Validate a call of ``op`` (``swiglu`` with ``x_dot=None``, ``swiglu_jvp`` with it); ``w2=None``
    for the gate launch alone."""
    dtype = check_tensors(op, {"x": x, "w1": w1, "w3": w3, "w2": w2, "x_dot": x_dot})
    for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
        if w is not None and w.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    hidden, dim = w1.shape
    check_shape(op, "w3", w3, w1.shape, "the up projection has the gate projection's shape (hidden, dim)")
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"{op}: x must have shape (..., {dim}) to match w1 {tuple(w1.shape)}, got {tuple(x.shape)}")
    if x_dot is not None:
        check_shape(op, "x_dot", x_dot, x.shape, "the tangent of x has x's shape")
    if w2 is not None and w2.shape[1] != hidden:
        raise ValueError(f"{op}: w2 must have shape (out_features, {hidden}) to take the {hidden} hidden "
                         f"features of w1 and w3, got {tuple(w2.shape)}")
    check_no_bf16_dot_on_cpu(op, dtype, x.device)


def swiglu_gate_fwd(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, x_dot=None, store_ab: bool = False,
                    check: bool = True):
    """Launch the gate kernel; returns (g, ġ, a, b), all (..., hidden) in x's dtype: g = silu(a) ⊙ b,
    ġ = silu'(a) ⊙ ȧ ⊙ b + silu(a) ⊙ ḃ for a = x W1ᵀ, b = x W3ᵀ; ``x_dot=None`` runs the primal stream
    alone and returns ġ = None; a and b when ``store_ab``, empty tensors otherwise. Inputs of any strides
    are read in place ((..., D) viewed as rows with ``reshape``); outputs are contiguous.
    ``check=False``: the caller has validated the inputs."""
    has_tangent = x_dot is not None
    if check:
        _check_swiglu("swiglu_jvp (gate)" if has_tangent else "swiglu (gate)", x, w1, w3, None, x_dot)
    hidden, k = w1.shape
    lead = x.shape[:-1]
    x2 = rows(x, k)
    xd2 = rows(x_dot, k) if has_tangent else x2  # x2: never read (HAS_TANGENT=False)
    m = x2.shape[0]
    g = torch.empty(*lead, hidden, dtype=x.dtype, device=x.device)
    g_dot = torch.empty_like(g) if has_tangent else None
    a = torch.empty_like(g) if store_ab else x.new_empty(0)
    b = torch.empty_like(g) if store_ab else x.new_empty(0)
    if m == 0 or hidden == 0:
        return g, g_dot, a, b
    # (K = 0 needs no special case: the reduction loop runs zero times, a = b = 0 and g = ġ = 0.)
    args = (x2, xd2, w1, w3, g, g_dot if has_tangent else g, a if store_ab else g, b if store_ab else g,
            m, hidden, k,
            x2.stride(0), x2.stride(1), xd2.stride(0), xd2.stride(1),
            w1.stride(0), w1.stride(1), w3.stride(0), w3.stride(1))
    flags = dict(HAS_TANGENT=has_tangent, STORE_AB=bool(store_ab), INPUT_PRECISION=input_precision(x.dtype))
    if x.is_cuda:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(hidden, meta["BLOCK_N"]),)  # noqa: E731
        with torch.cuda.device(x.device):
            _cuda_kernel()[grid](*args, **flags)
    else:
        c = CPU_GEMM_CONFIG
        grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(hidden, c["BLOCK_N"]),)
        _swiglu_gate_kernel[grid](*args, **flags, **c)
    return g, g_dot, a, b


# torch.library custom ops: torch.compile treats each launch as one opaque node; register_fake gives shapes.
@kernel_op("meanflow_fast::swiglu_gate_fwd")
def swiglu_gate_fwd_op(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, x_dot: torch.Tensor, store_ab: bool
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return swiglu_gate_fwd(x, w1, w3, x_dot, store_ab, check=False)


def _gate_fake(x, w1, store_ab, n):
    g = x.new_empty(*x.shape[:-1], w1.shape[0])
    ab = [torch.empty_like(g) if store_ab else x.new_empty(0) for _ in range(2)]
    return (g,) + tuple(torch.empty_like(g) for _ in range(n - 1)) + tuple(ab)


@swiglu_gate_fwd_op.register_fake
def _swiglu_gate_fwd_fake(x, w1, w3, x_dot, store_ab):
    _check_swiglu("swiglu_jvp (gate)", x, w1, w3, None, x_dot)
    return _gate_fake(x, w1, store_ab, 2)


@kernel_op("meanflow_fast::swiglu_gate_primal_fwd")
def swiglu_gate_primal_fwd_op(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, store_ab: bool
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Primal only: (g, a, b) (a and b empty without ``store_ab``)."""
    g, _, a, b = swiglu_gate_fwd(x, w1, w3, None, store_ab, check=False)
    return g, a, b


@swiglu_gate_primal_fwd_op.register_fake
def _swiglu_gate_primal_fwd_fake(x, w1, w3, store_ab):
    _check_swiglu("swiglu (gate)", x, w1, w3, None, None)
    return _gate_fake(x, w1, store_ab, 1)


def swiglu_fwd(x, w1, w3, w2, store_ab: bool = False, check: bool = True):
    """(y, a, b), primal only: the gate kernel (HAS_TANGENT=False), then W2 on cuBLAS (``F.linear``); a
    and b (x's dtype) when ``store_ab``, else empty. ``check=False``: the caller has validated the inputs."""
    if check:
        _check_swiglu("swiglu", x, w1, w3, w2, None)
    g, a, b = swiglu_gate_primal_fwd_op(x, w1, w3, store_ab)
    return F.linear(g, w2), a, b


def swiglu_jvp_fwd(x, w1, w3, w2, x_dot, store_ab: bool = False, check: bool = True):
    """(y, ẏ, a, b): the gate kernel on both streams, then W2 by linear.py's dual matmul on (g, ġ); a
    and b when ``store_ab``, else empty. g and ġ are written once and read once. ``check=False``: the
    caller has validated the inputs."""
    if check:
        _check_swiglu("swiglu_jvp", x, w1, w3, w2, x_dot)
    g, g_dot, a, b = swiglu_gate_fwd_op(x, w1, w3, x_dot, store_ab)
    y, y_dot, _ = dual_linear_fwd_op(g, w2, None, g_dot, False, False)
    return y, y_dot, a, b


def swiglu_bwd(dg: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               check: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(da, db, g): da = dg ⊙ b ⊙ silu'(a), db = dg ⊙ silu(a) and g = silu(a) ⊙ b, all (M, N) contiguous
    in a's dtype, math in fp32, for 2-D (M, N) ``dg``, ``a``, ``b`` of any strides (read in place).

    One pass in place of a chain of torch elementwise kernels over fp32 temporaries (casts, σ, silu, silu',
    the products): 3 values read and 3 written per element, in the input dtype. dg is the dy W2 GEMM's
    output, read as it is. The tiles, rows per program and warps are mlp.py's GELU pass's
    (``launch.elementwise_row_launch``); this pass has no column sums. ``check=False``: the caller has validated the
    inputs."""
    if check:
        check_tensors("swiglu_bwd", {"dg": dg, "a": a, "b": b})
        if a.dim() != 2:
            raise ValueError(f"swiglu_bwd: a must be 2-D (rows, hidden), got shape {tuple(a.shape)}")
        check_shape("swiglu_bwd", "dg", dg, a.shape, "the gradient of g = silu(a) ⊙ b has a's shape")
        check_shape("swiglu_bwd", "b", b, a.shape, "the up projection has the gate pre-activation's shape")
    M, N = a.shape
    da = torch.empty(M, N, dtype=a.dtype, device=a.device)
    db, g = torch.empty_like(da), torch.empty_like(da)
    if M > 0 and N > 0:
        block_r, rows_per_prog, block_n = elementwise_row_launch(M, N, a.is_cuda)
        _swiglu_bwd_kernel[(triton.cdiv(M, rows_per_prog), triton.cdiv(N, block_n))](
            dg, a, b, da, db, g, M, N,
            dg.stride(0), dg.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            ROWS_PER_PROG=rows_per_prog, BLOCK_R=block_r, BLOCK_N=block_n,
            num_warps=8 if block_r * block_n >= 2048 else 4)
    return da, db, g


@kernel_op("meanflow_fast::swiglu_bwd")
def swiglu_bwd_op(dg: torch.Tensor, a: torch.Tensor, b: torch.Tensor
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return swiglu_bwd(dg, a, b, check=False)


@swiglu_bwd_op.register_fake
def _swiglu_bwd_fake(dg, a, b):
    return a.new_empty(a.shape), a.new_empty(a.shape), a.new_empty(a.shape)


# ---------------------------------------------------------------------------------------------
# autograd.Functions
# ---------------------------------------------------------------------------------------------
def _silu_parts(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(silu(a), silu'(a)) in torch, in a's dtype (the jvp rule with weight tangents)."""
    s = torch.sigmoid(a)
    return a * s, s * (1 + a * (1 - s))


def _swiglu_backward(ctx, dy):
    """(dx, dW1, dW3, dW2) from the saved (x, a, b, W1, W3, W2): torch GEMMs (cuBLAS on CUDA; nothing of
    the tangent stream to fuse in) and one Triton pass (``swiglu_bwd``) from dg = dy W2 (the GEMM's output
    read in place) to da, db and the g = silu(a) ⊙ b that dW2 needs. When only dW2 is asked for, g is
    recomputed in torch (fp32 for fp16/bf16)."""
    if dy is None:  # y took no part in the loss (gradients are not materialised as zeros)
        return None, None, None, None
    x, a, b, w1, w3, w2 = ctx.saved_tensors
    hidden, dim = w1.shape
    need = ctx.needs_input_grad
    dy2, a2, b2 = rows(dy, w2.shape[0]), rows(a, hidden), rows(b, hidden)
    dx = dw1 = dw3 = dw2 = None
    g = None
    if need[0] or need[1] or need[2]:
        da, db, g = swiglu_bwd_op(dy2 @ w2, a2, b2)
        if need[0]:
            dx = (da @ w1 + db @ w3).reshape(x.shape)
        x2 = rows(x, dim)
        if need[1]:
            dw1 = da.t() @ x2
        if need[2]:
            dw3 = db.t() @ x2
    if need[3]:
        if g is None:
            dt = compute_dtype(a.dtype)
            g = (F.silu(a2.to(dt)) * b2.to(dt)).to(a.dtype)
        dw2 = dy2.t() @ g
    return dx, dw1, dw3, dw2


@jvp_function(jvp_inputs=4)
class SwigluFunction(KernelFunction):
    """(x, W1, W3, W2) → (y, a, b), primal only, in the torch.func form (a and b are outputs so that
    setup_context can save them; ``swiglu`` drops them). Saves x, a, b and the weights; backward:
    ``_swiglu_backward``. ``jvp`` runs the dual kernels when only x has a tangent, and the explicit rule
    in torch when the weights have tangents too (a rare use, no fused kernel for it)."""

    @staticmethod
    def forward(x, w1, w3, w2, need_backward: bool):
        return swiglu_fwd(x, w1, w3, w2, store_ab=need_backward, check=False)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w1, w3, w2, need_backward = inputs
        _, a, b = output
        if need_backward:
            ctx.save_for_backward(x, a, b, w1, w3, w2)
        ctx.mark_non_differentiable(a, b)
        ctx.set_materialize_grads(False)

    @staticmethod
    @backward_once
    def backward(ctx, dy, _da, _db):
        return _swiglu_backward(ctx, dy) + (None,)

    @staticmethod
    def jvp(ctx, x_t, w1_t, w3_t, w2_t, _need_t):
        x, w1, w3, w2 = ctx.saved_tensors
        if w1_t is None and w3_t is None and w2_t is None:
            # check: the tangent comes from the caller of torch.func.jvp, unvalidated so far
            return swiglu_jvp_fwd(x, w1, w3, w2, zeros_if_none(x_t, x))[1], None, None
        x_t = zeros_if_none(x_t, x)
        a, b = F.linear(x, w1), F.linear(x, w3)
        a_t, b_t = F.linear(x_t, w1), F.linear(x_t, w3)
        if w1_t is not None:
            a_t = a_t + F.linear(x, w1_t)
        if w3_t is not None:
            b_t = b_t + F.linear(x, w3_t)
        silu, dsilu = _silu_parts(a)
        y_t = F.linear(dsilu * a_t * b + silu * b_t, w2)
        if w2_t is not None:
            y_t = y_t + F.linear(silu * b, w2_t)
        return y_t, None, None


SwigluFunctionWithoutJvp = SwigluFunction.without_jvp


class SwigluJvpFunction(KernelFunction):
    """(x, W1, W3, W2, ẋ) → (y, ẏ, a, b). Saves x, a, b and the weights (g = silu(a) ⊙ b is recomputed in
    the backward); nothing of the tangent stream is saved, ẏ is marked non-differentiable. The torch.func
    form: a and b are outputs too (``swiglu_jvp`` drops them)."""

    @staticmethod
    def forward(x, w1, w3, w2, x_dot, need_backward: bool):
        return swiglu_jvp_fwd(x, w1, w3, w2, x_dot, store_ab=need_backward, check=False)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w1, w3, w2, _, need_backward = inputs
        _, y_dot, a, b = output
        if need_backward:
            ctx.save_for_backward(x, a, b, w1, w3, w2)
        ctx.mark_non_differentiable(y_dot, a, b)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for ẏ

    @staticmethod
    @backward_once
    def backward(ctx, dy, _dy_dot, _da, _db):
        return _swiglu_backward(ctx, dy) + (None, None)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------
def _needs_backward(*tensors) -> bool:
    """Will autograd call the backward? Only then are a and b written and saved."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def swiglu(x, w1, w3, w2) -> torch.Tensor:
    """y = (silu(x W1ᵀ) ⊙ x W3ᵀ) W2ᵀ, primal only: the gate kernel, then W2 on cuBLAS; differentiable
    (forward mode runs the dual kernels). Same signature and contract as ``swiglu_ref``: w1, w3
    (hidden, D), w2 (out, hidden), no biases; fp32/fp16/bf16, CUDA or the CPU interpreter (no bf16 there)."""
    _check_swiglu("swiglu", x, w1, w3, w2, None)
    fn = pick_function(SwigluFunction, SwigluFunctionWithoutJvp)
    return fn.apply(x, w1, w3, w2, _needs_backward(x, w1, w3, w2))[0]


def swiglu_jvp(x, w1, w3, w2, x_dot) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, ẏ) of the SwiGLU MLP: the gate kernel on both streams, then W2 by the dual matmul; y is
    differentiable, ẏ carries no autograd graph. Same signature and contract as ``swiglu_jvp_ref``."""
    if x_dot is None:
        raise ValueError("swiglu_jvp: x_dot must be a tensor (the tangent of x; zeros for a constant x); for the "
                         "primal alone use swiglu")
    _check_swiglu("swiglu_jvp", x, w1, w3, w2, x_dot)
    return SwigluJvpFunction.apply(x, w1, w3, w2, x_dot, _needs_backward(x, w1, w3, w2))[:2]
