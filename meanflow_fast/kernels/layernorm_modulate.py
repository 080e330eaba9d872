"""LayerNorm (no affine) followed by adaLN modulate, with its tangent.

    y = (x − μ)/σ,                m = y·(1 + scale) + shift
    ẏ = (ẋ − mean(ẋ) − y·mean(y ⊙ ẋ))/σ,   ṁ = ẏ·(1 + scale) + y·scalė + shifṫ

(docs/DESIGN.md, JVP rules: LayerNorm-modulate.)

x: (B, N, D); shift, scale and their tangents: (B, D), broadcast over the N tokens.

The Triton path is one row-wise kernel for both streams (x and ẋ read once, m and ṁ written once,
statistics in fp32) and one backward kernel for the primal stream (dx, and per-block partial sums of
dshift and dscale). The same forward kernel with HAS_TANGENT=False is the primal-only op
``ln_modulate`` of the DiT's plain forward (x read once, m written once; same backward).
"""
from typing import Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .reference import compute_dtype
from .launch import (KernelFunction, backward_once, check_shape, check_tangents_together, check_tensors,
                     jvp_function, kernel_op, next_pow2, pick_function, rows, steps_per_program, zeros_if_none)
from .rownorm import ln_modulate_bwd_rows, ln_project, ln_rows, row_num_warps, tile_rows, token_rows


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


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _ln_modulate_fwd_kernel(
    X,              # (M, D) primal rows (M = B·N), any strides
    XD,             # (M, D) tangent rows, any strides (not read when HAS_TANGENT is False)
    SHIFT,          # (B, D) shift, any strides
    SCALE,          # (B, D) scale
    SHIFT_D,        # (B, D) tangent of shift (not read when HAS_TANGENT is False)
    SCALE_D,        # (B, D) tangent of scale (not read when HAS_TANGENT is False)
    OUT,            # (M, D) out: m = y·(1 + scale) + shift, contiguous
    OUT_D,          # (M, D) out: ṁ, contiguous (not written when HAS_TANGENT is False)
    MEAN,           # (M,) out, fp32: row mean μ (for the backward)
    RSTD,           # (M,) out, fp32: 1/σ = 1/√(var + eps)
    n_rows,         # M
    D,              # features per row
    N_TOK,          # tokens per batch element: row r uses the modulation of batch r // N_TOK
    eps,            # LayerNorm epsilon
    stride_xm, stride_xd,        # strides of X
    stride_xdm, stride_xdd,      # strides of XD
    stride_shb, stride_shd,      # strides of SHIFT
    stride_scb, stride_scd,      # strides of SCALE
    stride_shdb, stride_shdd,    # strides of SHIFT_D
    stride_scdb, stride_scdd,    # strides of SCALE_D
    HAS_TANGENT: tl.constexpr,   # False: primal only (m, mean, rstd); the tangent loads, math and store
                                 # are compiled out
    BLOCK_R: tl.constexpr,       # rows per program
    BLOCK_D: tl.constexpr,       # next power of two ≥ D (a whole row per tile: the statistics need it)
):
    row = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    col = tl.arange(0, BLOCK_D).to(tl.int64)
    r_mask = row < n_rows
    c_mask = col < D
    mask = r_mask[:, None] & c_mask[None, :]

    # Statistics in fp32 (two-pass variance on the registers: no cancellation).
    x = tl.load(X + row[:, None] * stride_xm + col[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    mean, rstd, y = ln_rows(x, mask, D, eps)                       # y: 0 outside the row

    # Modulation of each row's batch element (B·D values, served from L2 to the N rows that share them).
    b = row // N_TOK
    sh = tl.load(SHIFT + b[:, None] * stride_shb + col[None, :] * stride_shd, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(SCALE + b[:, None] * stride_scb + col[None, :] * stride_scd, mask=mask, other=0.0).to(tl.float32)
    m = y * (1.0 + sc) + sh
    out = row[:, None] * D + col[None, :]
    tl.store(OUT + out, m.to(OUT.dtype.element_ty), mask=mask)

    if HAS_TANGENT:
        # ẏ = (ẋ − mean ẋ − y·mean(y ⊙ ẋ))·rstd
        xd = tl.load(XD + row[:, None] * stride_xdm + col[None, :] * stride_xdd, mask=mask, other=0.0).to(tl.float32)
        yd = ln_project(xd, y, rstd, D)
        shd = tl.load(SHIFT_D + b[:, None] * stride_shdb + col[None, :] * stride_shdd,
                      mask=mask, other=0.0).to(tl.float32)
        scd = tl.load(SCALE_D + b[:, None] * stride_scdb + col[None, :] * stride_scdd,
                      mask=mask, other=0.0).to(tl.float32)
        md = yd * (1.0 + sc) + y * scd + shd   # ṁ = ẏ·(1 + scale) + y·scalė + shifṫ
        tl.store(OUT_D + out, md.to(OUT_D.dtype.element_ty), mask=mask)

    tl.store(MEAN + row, mean, mask=r_mask)
    tl.store(RSTD + row, rstd, mask=r_mask)


@triton.jit
def _ln_modulate_bwd_kernel(
    DM,             # (M, D) gradient of m, any strides
    X,              # (M, D) saved primal input, any strides
    SCALE,          # (B, D) scale, any strides
    MEAN,           # (M,) fp32 saved μ
    RSTD,           # (M,) fp32 saved 1/σ
    DX,             # (M, D) out: dx, contiguous
    DSHIFT_PART,    # (B, P, D) out, fp32: Σ dm over this program's tokens
    DSCALE_PART,    # (B, P, D) out, fp32: Σ dm ⊙ y over this program's tokens
    D,              # features per row
    N_TOK,          # tokens per batch element
    P,              # programs per batch element = cdiv(N_TOK, ROWS_PER_PROG)
    stride_dmm, stride_dmd,     # strides of DM
    stride_xm, stride_xd,       # strides of X
    stride_scb, stride_scd,     # strides of SCALE
    ROWS_PER_PROG: tl.constexpr,  # tokens per program (a multiple of BLOCK_R)
    BLOCK_R: tl.constexpr,        # rows per step of the token loop
    BLOCK_D: tl.constexpr,        # next power of two ≥ D
):
    # Grid (B, P): every program stays inside one batch element, so its partial sums of dshift and
    # dscale belong to one (b, p) slot: a deterministic two-stage reduction, no atomics.
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    col = tl.arange(0, BLOCK_D).to(tl.int64)
    c_mask = col < D
    sc1 = 1.0 + tl.load(SCALE + b * stride_scb + col * stride_scd, mask=c_mask, other=0.0).to(tl.float32)
    acc_dshift = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_dscale = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r0 in range(0, ROWS_PER_PROG, BLOCK_R):
        row, r_mask, mask = token_rows(b, p, r0, N_TOK, c_mask, ROWS_PER_PROG, BLOCK_R)
        dm, y, dx = ln_modulate_bwd_rows(DM, X, MEAN, RSTD, row, r_mask, mask, col, sc1, D,
                                         stride_dmm, stride_dmd, stride_xm, stride_xd)
        acc_dshift += tl.sum(dm, axis=0)
        acc_dscale += tl.sum(dm * y, axis=0)
        tl.store(DX + row[:, None] * D + col[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    part = (b * P + p) * D + col
    tl.store(DSHIFT_PART + part, acc_dshift, mask=c_mask)
    tl.store(DSCALE_PART + part, acc_dscale, mask=c_mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
# Tiles: whole rows, ~2048 values each (rownorm.tile_rows), for the dual and the primal-only launch.
def check_ln_modulate(op: str, x, shift, scale, x_dot, shift_dot, scale_dot, eps) -> float:
    """Validate a call of ``op`` (``ln_modulate`` without the tangents, ``ln_modulate_jvp`` with all three)."""
    tangents = {"x_dot": x_dot, "shift_dot": shift_dot, "scale_dot": scale_dot}
    has_tangent = check_tangents_together(op, tangents)
    check_tensors(op, {"x": x, "shift": shift, "scale": scale, **tangents})
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be 3-D (B, N, D), got shape {tuple(x.shape)}")
    B, _, D = x.shape
    if D == 0:
        raise ValueError(f"{op}: x has D = 0 features; LayerNorm needs D ≥ 1")
    if has_tangent:
        check_shape(op, "x_dot", x_dot, x.shape, "the tangent of x has x's shape")
    for name, t in (("shift", shift), ("scale", scale), ("shift_dot", shift_dot), ("scale_dot", scale_dot)):
        if t is not None:
            check_shape(op, name, t, (B, D), "(B, D) of x = (B, N, D), broadcast over the N tokens")
    try:  # a Python or NumPy number or a 0-d tensor, as float() takes it
        value = float(eps)
    except (TypeError, ValueError, RuntimeError):
        value = float("nan")
    if isinstance(eps, bool) or not value >= 0:
        raise ValueError(f"{op}: eps must be a non-negative float, got {eps!r}")
    return value


def ln_modulate_fwd(x, shift, scale, x_dot=None, shift_dot=None, scale_dot=None, eps: float = 1e-6,
                    check: bool = True):
    """Launch the forward kernel; returns (m, ṁ, mean, rstd): m and ṁ (B, N, D) in x's dtype, mean and
    rstd (B·N,) in fp32. Without the tangents (all three None) the kernel runs primal only
    (HAS_TANGENT=False) and ṁ is None. Every input is read in place through its strides (the (B, D)
    modulation is typically a non-contiguous ``chunk`` of the adaLN output); outputs are contiguous.
    ``check=False``: the caller has validated the inputs."""
    has_tangent = x_dot is not None or shift_dot is not None or scale_dot is not None
    if check:
        eps = check_ln_modulate("ln_modulate_jvp" if has_tangent else "ln_modulate",
                                x, shift, scale, x_dot, shift_dot, scale_dot, eps)
    B, N, D = x.shape
    x2 = rows(x, D)
    M = x2.shape[0]
    out = torch.empty(B, N, D, dtype=x.dtype, device=x.device)
    if has_tangent:
        xd2, out_d = rows(x_dot, D), torch.empty_like(out)
    else:  # never read or written (HAS_TANGENT=False)
        xd2, shift_dot, scale_dot, out_d = x2, shift, scale, out
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M > 0:
        block_d = next_pow2(D)
        block_r = tile_rows(block_d)
        grid = (triton.cdiv(M, block_r),)
        _ln_modulate_fwd_kernel[grid](
            x2, xd2, shift, scale, shift_dot, scale_dot, out, out_d, mean, rstd,
            M, D, N, float(eps),
            x2.stride(0), x2.stride(1), xd2.stride(0), xd2.stride(1),
            shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1),
            shift_dot.stride(0), shift_dot.stride(1), scale_dot.stride(0), scale_dot.stride(1),
            HAS_TANGENT=has_tangent, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=row_num_warps(block_d, block_r))
    return out, (out_d if has_tangent else None), mean, rstd


def _ln_modulate_bwd_launch(B: int, N: int, block_d: int, cuda: bool) -> Tuple[int, int]:
    """(rows per tile, tokens per program) of the backward. On CUDA: twice the forward's tile (4 rows at
    D = 768, 2 blocks per SM on sm_90) and at least 8 tokens per program, which keeps the fp32 partial
    sums of dshift and dscale at half an activation's bytes; past ~16 k tiles, ``steps_per_program``."""
    block_r = tile_rows(block_d) * (2 if cuda else 1)
    min_steps = triton.cdiv(8, block_r) if cuda else 1
    return block_r, block_r * max(min_steps, steps_per_program(triton.cdiv(B * N, block_r)))


def ln_modulate_bwd(dm, x, scale, mean, rstd):
    """Launch the backward kernel; returns (dx, dshift, dscale) in the dtypes of x and scale.
    dshift = Σ_N dm and dscale = Σ_N dm ⊙ y are reduced in two stages: fp32 partial sums per
    (batch, token block) in the kernel, then one torch sum over the blocks (deterministic)."""
    B, N, D = x.shape
    x2, dm2 = rows(x, D), rows(dm, D)
    dx = torch.empty(B, N, D, dtype=x.dtype, device=x.device)
    block_d = next_pow2(D)
    block_r, rows_per_prog = _ln_modulate_bwd_launch(B, N, block_d, x.is_cuda)
    P = triton.cdiv(N, rows_per_prog) if N else 0
    dshift_part = torch.empty(B, P, D, dtype=torch.float32, device=x.device)
    dscale_part = torch.empty(B, P, D, dtype=torch.float32, device=x.device)
    if B * N > 0:
        _ln_modulate_bwd_kernel[(B, P)](
            dm2, x2, scale, mean, rstd, dx, dshift_part, dscale_part,
            D, N, P,
            dm2.stride(0), dm2.stride(1), x2.stride(0), x2.stride(1), scale.stride(0), scale.stride(1),
            ROWS_PER_PROG=rows_per_prog, BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=row_num_warps(block_d, block_r))
    return dx, dshift_part.sum(1).to(scale.dtype), dscale_part.sum(1).to(scale.dtype)


# torch.library custom ops: one opaque node each for torch.compile; register_fake gives the shapes.
@kernel_op("meanflow_fast::ln_modulate_fwd")
def ln_modulate_fwd_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, x_dot: torch.Tensor,
                       shift_dot: torch.Tensor, scale_dot: torch.Tensor, eps: float
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return ln_modulate_fwd(x, shift, scale, x_dot, shift_dot, scale_dot, eps, check=False)


@ln_modulate_fwd_op.register_fake
def _ln_modulate_fwd_fake(x, shift, scale, x_dot, shift_dot, scale_dot, eps):
    check_ln_modulate("ln_modulate_jvp", x, shift, scale, x_dot, shift_dot, scale_dot, eps)
    B, N, D = x.shape
    stat = x.new_empty(B * N, dtype=torch.float32)
    return x.new_empty(B, N, D), x.new_empty(B, N, D), stat, torch.empty_like(stat)


@kernel_op("meanflow_fast::ln_modulate_primal_fwd")
def ln_modulate_primal_fwd_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, _, mean, rstd = ln_modulate_fwd(x, shift, scale, eps=eps, check=False)
    return m, mean, rstd


@ln_modulate_primal_fwd_op.register_fake
def _ln_modulate_primal_fwd_fake(x, shift, scale, eps):
    check_ln_modulate("ln_modulate", x, shift, scale, None, None, None, eps)
    B, N, D = x.shape
    stat = x.new_empty(B * N, dtype=torch.float32)
    return x.new_empty(B, N, D), stat, torch.empty_like(stat)


@kernel_op("meanflow_fast::ln_modulate_bwd")
def ln_modulate_bwd_op(dm: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                       rstd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ln_modulate_bwd(dm, x, scale, mean, rstd)


@ln_modulate_bwd_op.register_fake
def _ln_modulate_bwd_fake(dm, x, scale, mean, rstd):
    return x.new_empty(x.shape), scale.new_empty(scale.shape), scale.new_empty(scale.shape)


# ---------------------------------------------------------------------------------------------
# autograd.Function
# ---------------------------------------------------------------------------------------------
def _ln_modulate_backward(ctx, dm):
    """(dx, dshift, dscale) from the saved x, scale and fp32 row statistics: one Triton kernel."""
    if dm is None:  # m took no part in the loss (gradients are not materialised as zeros)
        return None, None, None
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = ln_modulate_bwd_op(dm, x, scale, mean, rstd)
    need = ctx.needs_input_grad
    return dx if need[0] else None, dshift if need[1] else None, dscale if need[2] else None


@jvp_function(jvp_inputs=3)
class LnModulateFunction(KernelFunction):
    """(x, shift, scale) → (m, mean, rstd), primal only, in the torch.func form (the row statistics are
    outputs so that setup_context can save them; ``ln_modulate`` drops them). Saves x, scale and the
    statistics; the backward is the Triton backward of the dual op (it reads nothing of the tangent
    stream). ``jvp`` runs the dual kernel, so torch.func.jvp over a model calling ``ln_modulate`` stays
    on the fused kernels."""

    @staticmethod
    def forward(x, shift, scale, eps):
        return ln_modulate_primal_fwd_op(x, shift, scale, float(eps))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, scale, eps = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.eps = float(eps)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)

    @staticmethod
    @backward_once
    def backward(ctx, dm, _dmean, _drstd):
        return (*_ln_modulate_backward(ctx, dm), None)

    @staticmethod
    def jvp(ctx, x_t, shift_t, scale_t, _eps_t):
        x, shift, scale = ctx.saved_tensors
        tangents = zeros_if_none(x_t, x), zeros_if_none(shift_t, shift), zeros_if_none(scale_t, scale)
        check_ln_modulate("ln_modulate_jvp", x, shift, scale, *tangents, ctx.eps)
        m_dot = ln_modulate_fwd_op(x, shift, scale, *tangents, ctx.eps)[1]
        return m_dot, None, None


LnModulateFunctionWithoutJvp = LnModulateFunction.without_jvp


class LnModulateJvpFunction(KernelFunction):
    """(x, shift, scale, ẋ, shifṫ, scalė) → (m, ṁ). Saves x, scale and the fp32 row statistics (8 bytes
    a row); nothing of the tangent stream, and no zero-filled gradient for ṁ is made. The backward is a
    Triton kernel: in torch it would take ~6 elementwise passes and (M, D) fp32 temporaries for y, dy and
    the two reductions. The torch.func form: the statistics are outputs too (``ln_modulate_jvp`` drops
    them)."""

    @staticmethod
    def forward(x, shift, scale, x_dot, shift_dot, scale_dot, eps):
        return ln_modulate_fwd_op(x, shift, scale, x_dot, shift_dot, scale_dot, float(eps))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, m_dot, mean, rstd = output
        ctx.save_for_backward(inputs[0], inputs[2], mean, rstd)  # x, scale, μ, 1/σ
        ctx.mark_non_differentiable(m_dot, mean, rstd)
        ctx.set_materialize_grads(False)

    @staticmethod
    @backward_once
    def backward(ctx, dm, _dm_dot, _dmean, _drstd):
        return (*_ln_modulate_backward(ctx, dm), None, None, None, None)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------
def ln_modulate(x, shift, scale, eps: float = 1e-6) -> torch.Tensor:
    """m = LayerNorm(x)·(1 + scale) + shift (no affine) in one Triton kernel, primal only; differentiable
    (Triton backward). Same signature and contract as ``ln_modulate_ref``."""
    eps = check_ln_modulate("ln_modulate", x, shift, scale, None, None, None, eps)
    return pick_function(LnModulateFunction, LnModulateFunctionWithoutJvp).apply(x, shift, scale, eps)[0]


def ln_modulate_jvp(x, shift, scale, x_dot, shift_dot, scale_dot,
                    eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """(m, ṁ) of LayerNorm (no affine) + modulate in one Triton kernel; m is differentiable, ṁ carries
    no autograd graph. Same signature and contract as ``ln_modulate_jvp_ref``."""
    eps = check_ln_modulate("ln_modulate_jvp", x, shift, scale, x_dot, shift_dot, scale_dot, eps)
    return LnModulateJvpFunction.apply(x, shift, scale, x_dot, shift_dot, scale_dot, eps)[:2]
