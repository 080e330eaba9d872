"""RMSNorm (with a weight, over the last dim) and the iMF block's gated residual fused with the next
RMSNorm, with their tangents (docs/DESIGN.md, 8 Improved MeanFlow (iMF): the model, JVP rules of the iMF ops):

    r = (mean(x²) + eps)^(−1/2),  n = x·r,  y = n ⊙ w,    ẏ = w ⊙ r·(ẋ − n·mean(n ⊙ ẋ))
    h = x + f ⊙ g,                m = RMSNorm(h),         ḣ = ẋ + ḟ ⊙ g,   ṁ = RMSNorm's rule at h along ḣ

x, f and their tangents: (..., D), rows over the last dim; the weight w and the gate g: (D,), parameters
shared by every row (constants of the tangent: the ``*_jvp`` forms take no tangent for them).

``rms_norm`` is one row-wise kernel for both streams (x and ẋ read once, y and ẏ written once, the row
statistic in fp32) and one backward kernel for the primal stream: dx and per-program partial sums of
dw = Σ dy ⊙ n, summed in torch. ``gated_residual_rmsnorm`` is the iMF block's residual update followed
by the next sub-block's RMSNorm (the second norm of the block, the first of the next one, or the final
layer's), as ``gated_residual_ln`` is the DiT's: x, ẋ, f, ḟ read once, h, ḣ, m, ṁ written once. Its
backward adds h's two gradients (the next residual's dh and the norm's share through dm) in one pass:
dx = dh + RMS'(h)ᵀ(dm ⊙ w), df = g ⊙ dx, and the partial sums of dg = Σ dx ⊙ f and dw = Σ dm ⊙ n.
h is rounded to the input dtype before the norm reads it (and ḣ before its tangent is taken), so the
fused op equals the two ops run one after the other and the backward sees the forward's h.

With HAS_TANGENT=False the same forward kernels are the primal-only ops of the plain forward. A
tangent for a parameter, which only forward-mode AD over the primal functions can bring, takes the
explicit rule in torch on top of the dual kernel (ẏ += n ⊙ ẇ; ḣ += f ⊙ ġ).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .launch import (KernelFunction, backward_once, check_shape, check_tangents_together, check_tensors,
                     jvp_function, kernel_op, next_pow2, pick_function, rows, steps_per_program, zeros_if_none)
from .reference import compute_dtype
from .rownorm import prog_rows, row_num_warps, tile_rows


# ---------------------------------------------------------------------------------------------
# Reference (pure torch): RMSNorm, the per-channel gated residual, and the fused op composing them
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


def channel_gated_residual_ref(x, gate, f) -> torch.Tensor:
    """x + f ⊙ g: x, f (B, N, D), g (D,)."""
    return x + f * gate


def channel_gated_residual_jvp_ref(x, gate, f, x_dot, f_dot) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, ẏ) = (x + f ⊙ g, ẋ + ḟ ⊙ g); y is differentiable, ẏ carries no autograd graph."""
    y = x + f * gate
    with torch.no_grad():
        y_dot = x_dot + f_dot * gate
    return y, y_dot


def gated_residual_rmsnorm_ref(x, f, gate, weight, eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """(h, m): h = x + f ⊙ g, m = RMSNorm(h) with weight w."""
    h = channel_gated_residual_ref(x, gate, f)
    return h, rms_norm_ref(h, weight, eps)


def gated_residual_rmsnorm_jvp_ref(x, f, gate, weight, x_dot, f_dot, eps: float = 1e-6):
    """(h, ḣ, m, ṁ); h and m are differentiable, ḣ and ṁ carry no autograd graph."""
    h, h_dot = channel_gated_residual_jvp_ref(x, gate, f, x_dot, f_dot)
    m, m_dot = rms_norm_jvp_ref(h, weight, h_dot, eps)
    return h, h_dot, m, m_dot


# ---------------------------------------------------------------------------------------------
# Triton row helpers and kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _rms_rows(x, D, eps):
    """(r, n = x·r) of each row of x (fp32, 0 outside the row: masked loads with other=0)."""
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    return rstd, x * rstd[:, None]


@triton.jit
def _rms_project(v, n, rstd, D):
    """r·(v − n·mean(n ⊙ v)) per row: the Jacobian of n = x·r applied to v. It is symmetric, so the same
    map gives the tangent (v = ẋ) and the backward (v = w ⊙ dy). v must be 0 outside the row."""
    nv_mean = tl.sum(n * v, axis=1) / D
    return (v - n * nv_mean[:, None]) * rstd[:, None]


@triton.jit
def _rms_norm_fwd_kernel(
    X,              # (M, D) primal rows, any strides
    XD,             # (M, D) tangent rows, any strides (not read when HAS_TANGENT is False)
    W,              # (D,) weight, any stride
    OUT,            # (M, D) out: y = n ⊙ w, contiguous
    OUT_D,          # (M, D) out: ẏ, contiguous (not written when HAS_TANGENT is False)
    RSTD,           # (M,) out, fp32: r = (mean(x²) + eps)^(−1/2) (for the backward)
    n_rows,         # M
    D,              # features per row
    eps,            # RMSNorm epsilon
    stride_xm, stride_xd, stride_xdm, stride_xdd, stride_w,
    HAS_TANGENT: tl.constexpr,   # False: primal only (y, r); the tangent loads, math and store compiled out
    BLOCK_R: tl.constexpr,       # rows per program
    BLOCK_D: tl.constexpr,       # next power of two ≥ D (a whole row per tile: the statistic needs it)
):
    row = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    col = tl.arange(0, BLOCK_D).to(tl.int64)
    r_mask = row < n_rows
    c_mask = col < D
    mask = r_mask[:, None] & c_mask[None, :]
    out = row[:, None] * D + col[None, :]

    x = tl.load(X + row[:, None] * stride_xm + col[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + col * stride_w, mask=c_mask, other=0.0).to(tl.float32)
    rstd, n = _rms_rows(x, D, eps)
    tl.store(OUT + out, (n * w[None, :]).to(OUT.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd, mask=r_mask)

    if HAS_TANGENT:  # ẏ = w ⊙ r·(ẋ − n·mean(n ⊙ ẋ))
        xd = tl.load(XD + row[:, None] * stride_xdm + col[None, :] * stride_xdd, mask=mask, other=0.0).to(tl.float32)
        yd = _rms_project(xd, n, rstd, D) * w[None, :]
        tl.store(OUT_D + out, yd.to(OUT_D.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,             # (M, D) gradient of y, any strides
    X,              # (M, D) saved primal input, any strides
    W,              # (D,) weight, any stride
    RSTD,           # (M,) fp32 saved r
    DX,             # (M, D) out: dx = RMS'(x)ᵀ(w ⊙ dy), contiguous
    DW_PART,        # (P, D) out, fp32: Σ dy ⊙ n over this program's rows
    n_rows,         # M
    D,              # features per row
    stride_dym, stride_dyd, stride_xm, stride_xd, stride_w,
    ROWS_PER_PROG: tl.constexpr,  # rows per program (a multiple of BLOCK_R)
    BLOCK_R: tl.constexpr,        # rows per step of the row loop
    BLOCK_D: tl.constexpr,        # next power of two ≥ D
):
    # Grid (P,): program p owns one slot of the (P, D) partial sums of dw: a deterministic two-stage
    # reduction (the second stage is one torch sum), no atomics.
    p = tl.program_id(0).to(tl.int64)
    col = tl.arange(0, BLOCK_D).to(tl.int64)
    c_mask = col < D
    w = tl.load(W + col * stride_w, mask=c_mask, other=0.0).to(tl.float32)
    acc_dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r0 in range(0, ROWS_PER_PROG, BLOCK_R):
        row, r_mask, mask = prog_rows(p, r0, n_rows, c_mask, ROWS_PER_PROG, BLOCK_R)
        x = tl.load(X + row[:, None] * stride_xm + col[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row[:, None] * stride_dym + col[None, :] * stride_dyd, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row, mask=r_mask, other=0.0)
        n = x * rstd[:, None]
        acc_dw += tl.sum(dy * n, axis=0)
        dx = _rms_project(dy * w[None, :], n, rstd, D)
        tl.store(DX + row[:, None] * D + col[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PART + p * D + col, acc_dw, mask=c_mask)


@triton.jit
def _gated_residual_rmsnorm_fwd_kernel(
    X, F,           # (M, D) residual rows and branch output, any strides
    XD, FD,         # their tangents, any strides (not read unless HAS_TANGENT)
    G, W,           # (D,) gate and norm weight, any stride
    H, HD,          # (M, D) out: h = x + f ⊙ g and ḣ, contiguous (ḣ, ṁ written if HAS_TANGENT)
    OUT, OUT_D,     # (M, D) out: m = RMSNorm(h) and ṁ, contiguous
    RSTD,           # (M,) out, fp32: r of h (for the backward)
    n_rows,         # M
    D,              # features per row
    eps,            # RMSNorm epsilon
    stride_xm, stride_xd, stride_fm, stride_fd, stride_xdm, stride_xdd, stride_fdm, stride_fdd,
    stride_g, stride_w,
    HAS_TANGENT: tl.constexpr,   # False: primal only (h, m, r); the tangents compiled out
    BLOCK_R: tl.constexpr,       # rows per program
    BLOCK_D: tl.constexpr,       # next power of two ≥ D
):
    row = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    col = tl.arange(0, BLOCK_D).to(tl.int64)
    r_mask = row < n_rows
    c_mask = col < D
    mask = r_mask[:, None] & c_mask[None, :]
    out = row[:, None] * D + col[None, :]

    # Gated residual (0 outside the row), rounded to the output dtype before the norm reads it, as when
    # h goes through memory between two kernels.
    x = tl.load(X + row[:, None] * stride_xm + col[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(F + row[:, None] * stride_fm + col[None, :] * stride_fd, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + col * stride_g, mask=c_mask, other=0.0).to(tl.float32)
    w = tl.load(W + col * stride_w, mask=c_mask, other=0.0).to(tl.float32)
    h = (x + f * g[None, :]).to(H.dtype.element_ty)
    tl.store(H + out, h, mask=mask)
    rstd, n = _rms_rows(h.to(tl.float32), D, eps)
    tl.store(OUT + out, (n * w[None, :]).to(OUT.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd, mask=r_mask)

    if HAS_TANGENT:  # ḣ = ẋ + ḟ ⊙ g (rounded as h), then RMSNorm's tangent rule at h
        xd = tl.load(XD + row[:, None] * stride_xdm + col[None, :] * stride_xdd, mask=mask, other=0.0).to(tl.float32)
        fd = tl.load(FD + row[:, None] * stride_fdm + col[None, :] * stride_fdd, mask=mask, other=0.0).to(tl.float32)
        hd = (xd + fd * g[None, :]).to(HD.dtype.element_ty)
        tl.store(HD + out, hd, mask=mask)
        md = _rms_project(hd.to(tl.float32), n, rstd, D) * w[None, :]
        tl.store(OUT_D + out, md.to(OUT_D.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_rmsnorm_bwd_kernel(
    H,              # (M, D) saved h, any strides
    F,              # (M, D) saved branch output f, any strides
    G, W,           # (D,) gate and weight, any stride
    RSTD,           # (M,) fp32 saved r of h
    DM,             # (M, D) gradient of m, any strides (not read unless HAS_DM)
    DH,             # (M, D) gradient of h from its other consumer, any strides (not read unless HAS_DH)
    DX,             # (M, D) out: the total gradient of h, which is dx; contiguous
    DF,             # (M, D) out: g ⊙ dx, contiguous
    DW_PART,        # (P, D) out, fp32: Σ dm ⊙ n over this program's rows (written if HAS_DM)
    DG_PART,        # (P, D) out, fp32: Σ dx ⊙ f over this program's rows
    n_rows,         # M
    D,              # features per row
    stride_hm, stride_hd, stride_fm, stride_fd, stride_g, stride_w,
    stride_dmm, stride_dmd, stride_dhm, stride_dhd,
    HAS_DM: tl.constexpr,          # False: m took no part in the loss (the norm's share is 0)
    HAS_DH: tl.constexpr,          # False: h has no other consumer (dh = 0)
    ROWS_PER_PROG: tl.constexpr,   # rows per program (a multiple of BLOCK_R)
    BLOCK_R: tl.constexpr,         # rows per step of the row loop
    BLOCK_D: tl.constexpr,         # next power of two ≥ D
):
    p = tl.program_id(0).to(tl.int64)
    col = tl.arange(0, BLOCK_D).to(tl.int64)
    c_mask = col < D
    g = tl.load(G + col * stride_g, mask=c_mask, other=0.0).to(tl.float32)
    w = tl.load(W + col * stride_w, mask=c_mask, other=0.0).to(tl.float32)
    acc_dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_dg = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r0 in range(0, ROWS_PER_PROG, BLOCK_R):
        row, r_mask, mask = prog_rows(p, r0, n_rows, c_mask, ROWS_PER_PROG, BLOCK_R)
        dx = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        if HAS_DM:  # the norm's share RMS'(h)ᵀ(w ⊙ dm)
            h = tl.load(H + row[:, None] * stride_hm + col[None, :] * stride_hd, mask=mask, other=0.0).to(tl.float32)
            dm = tl.load(DM + row[:, None] * stride_dmm + col[None, :] * stride_dmd, mask=mask,
                         other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row, mask=r_mask, other=0.0)
            n = h * rstd[:, None]
            acc_dw += tl.sum(dm * n, axis=0)
            dx = _rms_project(dm * w[None, :], n, rstd, D)
        if HAS_DH:
            dx += tl.load(DH + row[:, None] * stride_dhm + col[None, :] * stride_dhd, mask=mask,
                          other=0.0).to(tl.float32)
        f = tl.load(F + row[:, None] * stride_fm + col[None, :] * stride_fd, mask=mask, other=0.0).to(tl.float32)
        acc_dg += tl.sum(dx * f, axis=0)
        out = row[:, None] * D + col[None, :]
        tl.store(DX + out, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DF + out, (g[None, :] * dx).to(DF.dtype.element_ty), mask=mask)
    if HAS_DM:
        tl.store(DW_PART + p * D + col, acc_dw, mask=c_mask)
    tl.store(DG_PART + p * D + col, acc_dg, mask=c_mask)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def _check_eps(op: str, eps) -> float:
    try:  # a Python or NumPy number or a 0-d tensor, as float() takes it
        value = float(eps)
    except (TypeError, ValueError, RuntimeError):
        value = float("nan")
    if isinstance(eps, bool) or not value >= 0:
        raise ValueError(f"{op}: eps must be a non-negative float, got {eps!r}")
    return value


def _check_rows(op: str, x) -> int:
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dim (..., D), got a 0-d tensor")
    D = x.shape[-1]
    if D == 0:
        raise ValueError(f"{op}: x has D = 0 features; RMSNorm needs D ≥ 1")
    return D


def check_rms_norm(op: str, x, weight, x_dot, eps, weight_dot=None) -> float:
    """Validate a call of ``op`` (``rms_norm`` without x_dot, ``rms_norm_jvp`` with it; ``weight_dot``:
    a forward-mode tangent of the weight). Returns eps as a float."""
    check_tensors(op, {"x": x, "weight": weight, "x_dot": x_dot, "weight_dot": weight_dot})
    D = _check_rows(op, x)
    check_shape(op, "weight", weight, (D,), "(D,) of x = (..., D)")
    if x_dot is not None:
        check_shape(op, "x_dot", x_dot, x.shape, "the tangent of x has x's shape")
    if weight_dot is not None:
        check_shape(op, "weight_dot", weight_dot, (D,), "the tangent of weight has weight's shape")
    return _check_eps(op, eps)


def check_gated_residual_rmsnorm(op: str, x, f, gate, weight, x_dot, f_dot, eps, gate_dot=None,
                                 weight_dot=None) -> float:
    """Validate a call of ``op`` (``gated_residual_rmsnorm`` without the tangents, ``..._jvp`` with both;
    ``gate_dot``, ``weight_dot``: forward-mode tangents of the parameters). Returns eps as a float."""
    has_tangent = check_tangents_together(op, {"x_dot": x_dot, "f_dot": f_dot})
    check_tensors(op, {"x": x, "f": f, "gate": gate, "weight": weight, "x_dot": x_dot, "f_dot": f_dot,
                       "gate_dot": gate_dot, "weight_dot": weight_dot})
    D = _check_rows(op, x)
    check_shape(op, "f", f, x.shape, "the branch output has x's shape")
    check_shape(op, "gate", gate, (D,), "(D,) of x = (..., D), one gate per channel")
    check_shape(op, "weight", weight, (D,), "(D,) of x = (..., D)")
    if has_tangent:
        check_shape(op, "x_dot", x_dot, x.shape, "the tangent of x has x's shape")
        check_shape(op, "f_dot", f_dot, x.shape, "the tangent of f has x's shape")
    for name, t in (("gate_dot", gate_dot), ("weight_dot", weight_dot)):
        if t is not None:
            check_shape(op, name, t, (D,), f"the tangent of {name[:-4]} has its shape")
    return _check_eps(op, eps)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
# Tiles: whole rows, ~2048 values each (rownorm.tile_rows), as the LayerNorm row kernels take.
def _fwd_grid(M: int, D: int) -> Tuple[int, int, int]:
    block_d = next_pow2(D)
    block_r = tile_rows(block_d)
    return triton.cdiv(M, block_r), block_r, block_d


def _bwd_launch(M: int, block_d: int, cuda: bool, fused: bool) -> Tuple[int, int]:
    """(rows per step, rows per program) of a backward. On CUDA: RMSNorm's steps are twice the forward's
    tile (the fused backward, with more live tiles, keeps the forward's) and a program walks at least 8
    rows, which keeps the fp32 partial sums small next to the activations; past ~16 k tiles,
    ``steps_per_program``."""
    block_r = tile_rows(block_d) * (2 if cuda and not fused else 1)
    min_steps = triton.cdiv(8, block_r) if cuda else 1
    return block_r, block_r * max(min_steps, steps_per_program(triton.cdiv(M, block_r)))


def rms_norm_fwd(x, weight, x_dot=None, eps: float = 1e-6, check: bool = True):
    """Launch the forward kernel; returns (y, ẏ, rstd): y and ẏ in x's shape and dtype (contiguous),
    rstd (M,) fp32 over the M = x.numel() / D rows. Without x_dot the kernel runs primal only
    (HAS_TANGENT=False) and ẏ is None. Inputs are read in place through their strides.
    ``check=False``: the caller has validated the inputs."""
    has_tangent = x_dot is not None
    if check:
        eps = check_rms_norm("rms_norm_jvp" if has_tangent else "rms_norm", x, weight, x_dot, eps)
    D = x.shape[-1]
    x2 = rows(x, D)
    M = x2.shape[0]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if has_tangent:
        xd2, out_d = rows(x_dot, D), torch.empty_like(out)
    else:  # never read or written (HAS_TANGENT=False)
        xd2, out_d = x2, out
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M > 0:
        grid, block_r, block_d = _fwd_grid(M, D)
        _rms_norm_fwd_kernel[(grid,)](
            x2, xd2, weight, out, out_d, rstd, M, D, float(eps),
            x2.stride(0), x2.stride(1), xd2.stride(0), xd2.stride(1), weight.stride(0),
            HAS_TANGENT=has_tangent, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=row_num_warps(block_d, block_r))
    return out, (out_d if has_tangent else None), rstd


def rms_norm_bwd(dy, x, weight, rstd):
    """Launch the backward kernel; returns (dx, dweight) in the dtypes of x and weight. dweight = Σ dy ⊙ n
    over all rows, in two stages: fp32 partial sums per program, then one torch sum (deterministic)."""
    D = x.shape[-1]
    x2, dy2 = rows(x, D), rows(dy, D)
    M = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_d = next_pow2(D)
    block_r, rows_per_prog = _bwd_launch(M, block_d, x.is_cuda, fused=False)
    P = triton.cdiv(M, rows_per_prog)
    dw_part = torch.empty(P, D, dtype=torch.float32, device=x.device)
    if M > 0:
        _rms_norm_bwd_kernel[(P,)](
            dy2, x2, weight, rstd, dx, dw_part, M, D,
            dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1), weight.stride(0),
            ROWS_PER_PROG=rows_per_prog, BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=row_num_warps(block_d, block_r))
    return dx, dw_part.sum(0).to(weight.dtype)


def gated_residual_rmsnorm_fwd(x, f, gate, weight, x_dot=None, f_dot=None, eps: float = 1e-6, check: bool = True):
    """Launch the fused forward kernel; returns (h, ḣ, m, ṁ, rstd): four tensors in x's shape and dtype
    (contiguous) and the fp32 (M,) statistic of h. Without the tangents (both None) the kernel runs
    primal only and ḣ, ṁ are None. ``check=False``: the caller has validated the inputs."""
    has_tangent = x_dot is not None or f_dot is not None
    if check:
        eps = check_gated_residual_rmsnorm("gated_residual_rmsnorm_jvp" if has_tangent else "gated_residual_rmsnorm",
                                           x, f, gate, weight, x_dot, f_dot, eps)
    D = x.shape[-1]
    x2, f2 = rows(x, D), rows(f, D)
    M = x2.shape[0]
    h, m = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(2))
    if has_tangent:
        xd2, fd2, h_dot, m_dot = rows(x_dot, D), rows(f_dot, D), torch.empty_like(h), torch.empty_like(m)
    else:  # never read or written (HAS_TANGENT=False)
        xd2, fd2, h_dot, m_dot = x2, f2, h, m
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M > 0:
        grid, block_r, block_d = _fwd_grid(M, D)
        _gated_residual_rmsnorm_fwd_kernel[(grid,)](
            x2, f2, xd2, fd2, gate, weight, h, h_dot, m, m_dot, rstd, M, D, float(eps),
            x2.stride(0), x2.stride(1), f2.stride(0), f2.stride(1), xd2.stride(0), xd2.stride(1),
            fd2.stride(0), fd2.stride(1), gate.stride(0), weight.stride(0),
            HAS_TANGENT=has_tangent, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=row_num_warps(block_d, block_r))
    if not has_tangent:
        return h, None, m, None, rstd
    return h, h_dot, m, m_dot, rstd


def gated_residual_rmsnorm_bwd(h, f, gate, weight, rstd, dm: Optional[torch.Tensor], dh: Optional[torch.Tensor]):
    """Launch the fused backward kernel (dm and dh not both None); returns (dx, df, dgate, dweight):
    dx = dh + RMS'(h)ᵀ(w ⊙ dm), df = g ⊙ dx (dtype of h), dgate = Σ dx ⊙ f and dweight = Σ dm ⊙ n (None
    without dm) in the parameters' dtype, from fp32 partial sums per program and one torch sum each."""
    D = h.shape[-1]
    h2, f2 = rows(h, D), rows(f, D)
    M = h2.shape[0]
    dm2 = rows(dm, D) if dm is not None else h2  # h2: never read (HAS_DM=False)
    dh2 = rows(dh, D) if dh is not None else h2  # never read (HAS_DH=False)
    dx, df = (torch.empty(h.shape, dtype=h.dtype, device=h.device) for _ in range(2))
    block_d = next_pow2(D)
    block_r, rows_per_prog = _bwd_launch(M, block_d, h.is_cuda, fused=True)
    P = triton.cdiv(M, rows_per_prog)
    dw_part, dg_part = (torch.empty(P, D, dtype=torch.float32, device=h.device) for _ in range(2))
    if M > 0:
        _gated_residual_rmsnorm_bwd_kernel[(P,)](
            h2, f2, gate, weight, rstd, dm2, dh2, dx, df, dw_part, dg_part, M, D,
            h2.stride(0), h2.stride(1), f2.stride(0), f2.stride(1), gate.stride(0), weight.stride(0),
            dm2.stride(0), dm2.stride(1), dh2.stride(0), dh2.stride(1),
            HAS_DM=dm is not None, HAS_DH=dh is not None, ROWS_PER_PROG=rows_per_prog, BLOCK_R=block_r,
            BLOCK_D=block_d, num_warps=row_num_warps(block_d, block_r))
    dweight = dw_part.sum(0).to(weight.dtype) if dm is not None else None
    return dx, df, dg_part.sum(0).to(gate.dtype), dweight


# torch.library custom ops: one opaque node each for torch.compile; register_fake gives the shapes.
@kernel_op("meanflow_fast::rms_norm_fwd")
def rms_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, x_dot: torch.Tensor, eps: float
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rms_norm_fwd(x, weight, x_dot, eps, check=False)


@rms_norm_fwd_op.register_fake
def _rms_norm_fwd_fake(x, weight, x_dot, eps):
    check_rms_norm("rms_norm_jvp", x, weight, x_dot, eps)
    M = x.numel() // x.shape[-1]
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(M, dtype=torch.float32)


@kernel_op("meanflow_fast::rms_norm_primal_fwd")
def rms_norm_primal_fwd_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = rms_norm_fwd(x, weight, eps=eps, check=False)
    return y, rstd


@rms_norm_primal_fwd_op.register_fake
def _rms_norm_primal_fwd_fake(x, weight, eps):
    check_rms_norm("rms_norm", x, weight, None, eps)
    return x.new_empty(x.shape), x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@kernel_op("meanflow_fast::rms_norm_bwd")
def rms_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_bwd(dy, x, weight, rstd)


@rms_norm_bwd_op.register_fake
def _rms_norm_bwd_fake(dy, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


@kernel_op("meanflow_fast::gated_residual_rmsnorm_fwd")
def gated_residual_rmsnorm_fwd_op(x: torch.Tensor, f: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                                  x_dot: torch.Tensor, f_dot: torch.Tensor, eps: float
                                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return gated_residual_rmsnorm_fwd(x, f, gate, weight, x_dot, f_dot, eps, check=False)


@gated_residual_rmsnorm_fwd_op.register_fake
def _gated_residual_rmsnorm_fwd_fake(x, f, gate, weight, x_dot, f_dot, eps):
    check_gated_residual_rmsnorm("gated_residual_rmsnorm_jvp", x, f, gate, weight, x_dot, f_dot, eps)
    return (*(x.new_empty(x.shape) for _ in range(4)), x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32))


@kernel_op("meanflow_fast::gated_residual_rmsnorm_primal_fwd")
def gated_residual_rmsnorm_primal_fwd_op(x: torch.Tensor, f: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                                         eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, _, m, _, rstd = gated_residual_rmsnorm_fwd(x, f, gate, weight, eps=eps, check=False)
    return h, m, rstd


@gated_residual_rmsnorm_primal_fwd_op.register_fake
def _gated_residual_rmsnorm_primal_fwd_fake(x, f, gate, weight, eps):
    check_gated_residual_rmsnorm("gated_residual_rmsnorm", x, f, gate, weight, None, None, eps)
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@kernel_op("meanflow_fast::gated_residual_rmsnorm_bwd")
def gated_residual_rmsnorm_bwd_op(h: torch.Tensor, f: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                                  rstd: torch.Tensor, dm: Optional[torch.Tensor], dh: Optional[torch.Tensor]
                                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, df, dgate, dweight = gated_residual_rmsnorm_bwd(h, f, gate, weight, rstd, dm, dh)
    # a custom op returns tensors only: zeros stand for "no gradient" (the Function drops them)
    return dx, df, dgate, dweight if dweight is not None else torch.zeros_like(weight)


@gated_residual_rmsnorm_bwd_op.register_fake
def _gated_residual_rmsnorm_bwd_fake(h, f, gate, weight, rstd, dm, dh):
    return h.new_empty(h.shape), h.new_empty(h.shape), gate.new_empty(gate.shape), weight.new_empty(weight.shape)


# ---------------------------------------------------------------------------------------------
# autograd.Functions
# ---------------------------------------------------------------------------------------------
def _rms_norm_backward(ctx, dy):
    """(dx, dweight) from the saved x, weight and fp32 r: one Triton kernel."""
    if dy is None:  # y took no part in the loss (gradients are not materialised as zeros)
        return None, None
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = rms_norm_bwd_op(dy, x, weight, rstd)
    need = ctx.needs_input_grad
    return dx if need[0] else None, dweight if need[1] else None


@jvp_function(jvp_inputs=2)
class RmsNormFunction(KernelFunction):
    """(x, weight) → (y, rstd), primal only, in the torch.func form (r is an output so that setup_context
    can save it; ``rms_norm`` drops it). Saves x, weight and r; the backward is the Triton backward (it
    reads nothing of a tangent stream). ``jvp`` runs the dual kernel, so torch.func.jvp over a model
    calling ``rms_norm`` stays on the fused kernel (a weight tangent adds n ⊙ ẇ, the primal kernel run
    with ẇ as its weight)."""

    @staticmethod
    def forward(x, weight, eps):
        return rms_norm_primal_fwd_op(x, weight, float(eps))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, eps = inputs
        ctx.save_for_backward(x, weight, output[1])
        ctx.eps = float(eps)
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    @staticmethod
    @backward_once
    def backward(ctx, dy, _drstd):
        return (*_rms_norm_backward(ctx, dy), None)

    @staticmethod
    def jvp(ctx, x_t, weight_t, _eps_t):
        x, weight = ctx.saved_tensors
        check_rms_norm("rms_norm_jvp", x, weight, x_t, ctx.eps, weight_t)
        y_dot = None
        if x_t is not None:
            y_dot = rms_norm_fwd_op(x, weight, x_t, ctx.eps)[1]
        if weight_t is not None:  # ∂y/∂w · ẇ = n ⊙ ẇ
            n_wdot = rms_norm_primal_fwd_op(x, weight_t, ctx.eps)[0]
            y_dot = n_wdot if y_dot is None else y_dot + n_wdot
        return y_dot if y_dot is not None else torch.zeros_like(x), None


RmsNormFunctionWithoutJvp = RmsNormFunction.without_jvp


class RmsNormJvpFunction(KernelFunction):
    """(x, weight, ẋ) → (y, ẏ, rstd). Saves x, weight and the fp32 r (4 bytes a row); nothing of the
    tangent stream. The backward is the Triton kernel of ``rms_norm``."""

    @staticmethod
    def forward(x, weight, x_dot, eps):
        return rms_norm_fwd_op(x, weight, x_dot, float(eps))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, y_dot, rstd = output
        ctx.save_for_backward(inputs[0], inputs[1], rstd)
        ctx.mark_non_differentiable(y_dot, rstd)
        ctx.set_materialize_grads(False)

    @staticmethod
    @backward_once
    def backward(ctx, dy, _dy_dot, _drstd):
        return (*_rms_norm_backward(ctx, dy), None, None)


def _gated_residual_rmsnorm_backward(ctx, dh, dm):
    """(dx, df, dgate, dweight) from the saved (h, f, g, w, r): one Triton pass over whichever of dh, dm
    took part in the loss."""
    if dh is None and dm is None:
        return None, None, None, None
    h, f, gate, weight, rstd = ctx.saved_tensors
    dx, df, dgate, dweight = gated_residual_rmsnorm_bwd_op(h, f, gate, weight, rstd, dm, dh)
    if dm is None:
        dweight = None  # m took no part: the op's zeros stand for no gradient
    return tuple(g if n else None for g, n in zip((dx, df, dgate, dweight), ctx.needs_input_grad))


@jvp_function(jvp_inputs=4)
class GatedResidualRmsNormFunction(KernelFunction):
    """(x, f, g, w) → (h, m, rstd), primal only, in the torch.func form (``gated_residual_rmsnorm`` drops
    r). Saves what the dual Function saves; the same backward. ``jvp`` runs the dual kernel; tangents of
    the parameters take the explicit rule in torch (ẋ += f ⊙ ġ before the kernel, ṁ += n(h) ⊙ ẇ after)."""

    @staticmethod
    def forward(x, f, gate, weight, eps):
        return gated_residual_rmsnorm_primal_fwd_op(x, f, gate, weight, float(eps))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, f, gate, weight, eps = inputs
        h, _, rstd = output
        ctx.save_for_backward(h, f, gate, weight, rstd)
        ctx.eps = float(eps)
        ctx.mark_non_differentiable(rstd)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for an unused h or m

    @staticmethod
    @backward_once
    def backward(ctx, dh, dm, _drstd):
        return (*_gated_residual_rmsnorm_backward(ctx, dh, dm), None)

    @staticmethod
    def jvp(ctx, x_t, f_t, gate_t, weight_t, _eps_t):
        x, f, gate, weight = ctx.saved_tensors
        x_t, f_t = zeros_if_none(x_t, x), zeros_if_none(f_t, f)
        check_gated_residual_rmsnorm("gated_residual_rmsnorm_jvp", x, f, gate, weight, x_t, f_t, ctx.eps,
                                     gate_t, weight_t)
        if gate_t is not None:  # ∂h/∂g · ġ = f ⊙ ġ
            x_t = x_t + f * gate_t
        h, h_dot, _, m_dot, _ = gated_residual_rmsnorm_fwd_op(x, f, gate, weight, x_t, f_t, ctx.eps)
        if weight_t is not None:  # ∂m/∂w · ẇ = n(h) ⊙ ẇ
            m_dot = m_dot + rms_norm_primal_fwd_op(h, weight_t, ctx.eps)[0]
        return h_dot, m_dot, None


GatedResidualRmsNormFunctionWithoutJvp = GatedResidualRmsNormFunction.without_jvp


class GatedResidualRmsNormJvpFunction(KernelFunction):
    """(x, f, g, w, ẋ, ḟ) → (h, ḣ, m, ṁ, rstd). Saves h, f, g, w and the fp32 r: what the two ops apart
    save, nothing of the tangent stream; ḣ and ṁ are non-differentiable. Backward: one Triton pass."""

    @staticmethod
    def forward(x, f, gate, weight, x_dot, f_dot, eps):
        return gated_residual_rmsnorm_fwd_op(x, f, gate, weight, x_dot, f_dot, float(eps))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, f, gate, weight = inputs[:4]
        h, h_dot, _, m_dot, rstd = output
        ctx.save_for_backward(h, f, gate, weight, rstd)
        ctx.mark_non_differentiable(h_dot, m_dot, rstd)
        ctx.set_materialize_grads(False)

    @staticmethod
    @backward_once
    def backward(ctx, dh, _dh_dot, dm, _dm_dot, _drstd):
        return (*_gated_residual_rmsnorm_backward(ctx, dh, dm), None, None, None)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------
def rms_norm(x, weight, eps: float = 1e-6) -> torch.Tensor:
    """y = x·(mean(x²) + eps)^(−1/2) ⊙ w over the last dim in one Triton kernel, primal only;
    differentiable in x and weight (Triton backward); forward-mode AD runs the dual kernel. Same
    signature and contract as ``rms_norm_ref``."""
    eps = check_rms_norm("rms_norm", x, weight, None, eps)
    return pick_function(RmsNormFunction, RmsNormFunctionWithoutJvp).apply(x, weight, eps)[0]


def rms_norm_jvp(x, weight, x_dot, eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, ẏ) of RMSNorm in one Triton kernel (the weight a constant of the tangent); y is differentiable,
    ẏ carries no autograd graph. Same signature and contract as ``rms_norm_jvp_ref``."""
    eps = check_rms_norm("rms_norm_jvp", x, weight, x_dot, eps)
    return RmsNormJvpFunction.apply(x, weight, x_dot, eps)[:2]


def gated_residual_rmsnorm(x, f, gate, weight, eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """(h, m): the residual update h = x + f ⊙ g (g a (D,) gate) and m = RMSNorm(h) with weight w, in one
    Triton kernel, primal only; both differentiable in x, f, g and w (one Triton backward). Same
    signature and contract as ``gated_residual_rmsnorm_ref``."""
    eps = check_gated_residual_rmsnorm("gated_residual_rmsnorm", x, f, gate, weight, None, None, eps)
    fn = pick_function(GatedResidualRmsNormFunction, GatedResidualRmsNormFunctionWithoutJvp)
    h, m, _ = fn.apply(x, f, gate, weight, eps)
    return h, m


def gated_residual_rmsnorm_jvp(x, f, gate, weight, x_dot, f_dot, eps: float = 1e-6):
    """(h, ḣ, m, ṁ): the residual update and the next RMSNorm with their tangents (gate and weight
    constants of the tangent) in one Triton kernel. h and m are differentiable, ḣ and ṁ carry no
    autograd graph. Same signature and contract as ``gated_residual_rmsnorm_jvp_ref``."""
    eps = check_gated_residual_rmsnorm("gated_residual_rmsnorm_jvp", x, f, gate, weight, x_dot, f_dot, eps)
    return GatedResidualRmsNormJvpFunction.apply(x, f, gate, weight, x_dot, f_dot, eps)[:4]
