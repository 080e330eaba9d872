"""Gated residual followed by the next LayerNorm + adaLN modulate, fused, with both tangents:

    y = x + g ⊙ f,                 ẏ = ẋ + ġ ⊙ f + g ⊙ ḟ                           (gated_residual.py)
    m = LN(y)·(1 + scale) + shift,  ṁ = LN'(y)ẏ·(1 + scale) + LN(y)·scalė + shifṫ  (layernorm_modulate.py)

(docs/DESIGN.md, JVP rules: gated residual + LayerNorm.)

x, f and their tangents: (B, N, D); g, shift, scale and their tangents: (B, D), broadcast over the N
tokens. In a DiT every gated residual is followed by a LayerNorm-modulate: the second LN of the same
block, the first LN of the next block, or the final layer's. Fused, the pair reads x, ẋ, f, ḟ once and
writes y, ẏ, m, ṁ once: 8 activation-sized passes instead of 10 (the LN no longer re-reads y and ẏ).

The backward gains more. y feeds two consumers, the next residual (gradient dy) and the LN (dm); apart,
autograd runs the LN backward (read dm, y; write dx_LN), adds the two gradients (read 2, write 1) and
runs the residual backward on the sum (read it and f; write df): 9 passes. Fused: read dm, dy, y, f;
write dx = dy + LN'(y)ᵀ(dm·(1 + scale)) and df = g ⊙ dx: 6 passes, and no (M, D) temporary. The
per-(batch, token block) partial sums of dshift, dscale and dg come out of the same pass.

The same kernel with HAS_TANGENT=False is the primal-only ``gated_residual_ln`` of the DiT's plain
forward (the guided target's no-grad pass, the sampler): it reads x and f and writes y and m, 4 passes
instead of 5, with the same backward.

y is rounded to the input dtype before the LayerNorm reads it, and ẏ before its tangent is taken, so
the fused op equals the two ops run one after the other (the reference composes the two references)
and the backward sees the same y as the forward. The switch ``residual_ln="apart"`` (config.py) runs
exactly that composition of the two Triton ops instead (the same results, for an A/B on a GPU).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import config
from .launch import (KernelFunction, backward_once, jvp_function, kernel_op, next_pow2, pick_function, rows,
                     steps_per_program, zeros_if_none)
from .gated_residual import (check_gated_residual, gated_residual, gated_residual_bwd_op, gated_residual_jvp,
                             gated_residual_jvp_ref, gated_residual_ref)
from .layernorm_modulate import check_ln_modulate, ln_modulate, ln_modulate_jvp, ln_modulate_jvp_ref, ln_modulate_ref
from .rownorm import ln_modulate_bwd_rows, ln_project, ln_rows, row_num_warps, tile_rows, token_rows


# ---------------------------------------------------------------------------------------------
# Reference (pure torch)
# ---------------------------------------------------------------------------------------------
def gated_residual_ln_ref(x, gate, f, shift, scale, eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, m): y = x + g ⊙ f, m = LN(y)·(1 + scale) + shift."""
    y = gated_residual_ref(x, gate, f)
    return y, ln_modulate_ref(y, shift, scale, eps)


def gated_residual_ln_jvp_ref(x, gate, f, shift, scale, x_dot, gate_dot, f_dot, shift_dot, scale_dot,
                              eps: float = 1e-6):
    """(y, ẏ, m, ṁ); y and m are differentiable, ẏ and ṁ carry no autograd graph."""
    y, y_dot = gated_residual_jvp_ref(x, gate, f, x_dot, gate_dot, f_dot)
    m, m_dot = ln_modulate_jvp_ref(y, shift, scale, y_dot, shift_dot, scale_dot, eps)
    return y, y_dot, m, m_dot


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _gated_residual_ln_fwd_kernel(
    X, G, F,                     # (M, D) residual rows, (B, D) gate, (M, D) branch output; any strides
    XD, GD, FD,                  # their tangents, any strides (no tangent is read unless HAS_TANGENT)
    SHIFT, SCALE,                # (B, D) modulation of the LayerNorm, any strides
    SHIFT_D, SCALE_D,            # their tangents
    Y, YD,                       # (M, D) out: y = x + g ⊙ f and ẏ, contiguous (ẏ, ṁ written if HAS_TANGENT)
    OUT, OUT_D,                  # (M, D) out: m and ṁ, contiguous
    MEAN, RSTD,                  # (M,) out, fp32: the LayerNorm's μ and 1/σ of y (for the backward)
    n_rows,                      # M = B·N
    D,                           # features per row
    N_TOK,                       # tokens per batch element: row r uses the (B, D) rows of batch r // N_TOK
    eps,                         # LayerNorm epsilon
    stride_xm, stride_xd, stride_gb, stride_gd, stride_fm, stride_fd,
    stride_xdm, stride_xdd, stride_gdb, stride_gdd, stride_fdm, stride_fdd,
    stride_shb, stride_shd, stride_scb, stride_scd,
    stride_shdb, stride_shdd, stride_scdb, stride_scdd,
    HAS_TANGENT: tl.constexpr,   # False: primal only (y, m and the statistics); the tangents compiled out
    BLOCK_R: tl.constexpr,       # rows per program
    BLOCK_D: tl.constexpr,       # next power of two ≥ D (a whole row per tile: the statistics need it)
):
    row = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    col = tl.arange(0, BLOCK_D).to(tl.int64)
    r_mask = row < n_rows
    mask = r_mask[:, None] & (col < D)[None, :]
    b = row // N_TOK
    out = row[:, None] * D + col[None, :]

    # Gated residual (0 outside the row: every load is masked with other=0), rounded to the output dtype
    # before the LayerNorm reads it, as when y goes through memory between two kernels.
    x = tl.load(X + row[:, None] * stride_xm + col[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + b[:, None] * stride_gb + col[None, :] * stride_gd, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(F + row[:, None] * stride_fm + col[None, :] * stride_fd, mask=mask, other=0.0).to(tl.float32)
    y = (x + g * f).to(Y.dtype.element_ty)
    tl.store(Y + out, y, mask=mask)

    # LayerNorm + modulate of y (the row helpers of layernorm_modulate.py).
    mean, rstd, yn = ln_rows(y.to(tl.float32), mask, D, eps)
    sh = tl.load(SHIFT + b[:, None] * stride_shb + col[None, :] * stride_shd, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(SCALE + b[:, None] * stride_scb + col[None, :] * stride_scd, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + out, (yn * (1.0 + sc) + sh).to(OUT.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean, mask=r_mask)
    tl.store(RSTD + row, rstd, mask=r_mask)

    if HAS_TANGENT:  # both tangents; ẏ rounded before the LayerNorm's tangent reads it, as y
        xd = tl.load(XD + row[:, None] * stride_xdm + col[None, :] * stride_xdd, mask=mask, other=0.0).to(tl.float32)
        gd = tl.load(GD + b[:, None] * stride_gdb + col[None, :] * stride_gdd, mask=mask, other=0.0).to(tl.float32)
        fd = tl.load(FD + row[:, None] * stride_fdm + col[None, :] * stride_fdd, mask=mask, other=0.0).to(tl.float32)
        yd = (xd + gd * f + g * fd).to(YD.dtype.element_ty)
        tl.store(YD + out, yd, mask=mask)
        ydn = ln_project(yd.to(tl.float32), yn, rstd, D)
        shd = tl.load(SHIFT_D + b[:, None] * stride_shdb + col[None, :] * stride_shdd, mask=mask,
                      other=0.0).to(tl.float32)
        scd = tl.load(SCALE_D + b[:, None] * stride_scdb + col[None, :] * stride_scdd, mask=mask,
                      other=0.0).to(tl.float32)
        tl.store(OUT_D + out, (ydn * (1.0 + sc) + yn * scd + shd).to(OUT_D.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_ln_bwd_kernel(
    DM,             # (M, D) gradient of m, any strides
    DY,             # (M, D) gradient of y from its other consumer, any strides (not read unless HAS_DY)
    Y,              # (M, D) saved y, any strides
    F,              # (M, D) saved branch output f, any strides
    G,              # (B, D) gate, any strides
    SCALE,          # (B, D) scale, any strides
    MEAN, RSTD,     # (M,) fp32 saved statistics of y
    DX,             # (M, D) out: the total gradient of y, which is dx; contiguous
    DF,             # (M, D) out: g ⊙ dx, contiguous
    DSHIFT_PART,    # (B, P, D) out, fp32: Σ dm over this program's tokens
    DSCALE_PART,    # (B, P, D) out, fp32: Σ dm ⊙ LN(y)
    DG_PART,        # (B, P, D) out, fp32: Σ dx ⊙ f
    D,              # features per row
    N_TOK,          # tokens per batch element
    P,              # programs per batch element = cdiv(N_TOK, ROWS_PER_PROG)
    stride_dmm, stride_dmd, stride_dym, stride_dyd, stride_ym, stride_yd, stride_fm, stride_fd,
    stride_gb, stride_gd, stride_scb, stride_scd,
    HAS_DY: tl.constexpr,          # False: y has no other consumer (the last block's), dy = 0
    ROWS_PER_PROG: tl.constexpr,   # tokens per program (a multiple of BLOCK_R)
    BLOCK_R: tl.constexpr,         # rows per step of the token loop
    BLOCK_D: tl.constexpr,         # next power of two ≥ D
):
    # Grid (B, P): every program stays inside one batch element, so its partial sums belong to one
    # (b, p) slot: a deterministic two-stage reduction, no atomics.
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    col = tl.arange(0, BLOCK_D).to(tl.int64)
    c_mask = col < D
    sc1 = 1.0 + tl.load(SCALE + b * stride_scb + col * stride_scd, mask=c_mask, other=0.0).to(tl.float32)
    g = tl.load(G + b * stride_gb + col * stride_gd, mask=c_mask, other=0.0).to(tl.float32)
    acc_dshift = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_dscale = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_dg = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r0 in range(0, ROWS_PER_PROG, BLOCK_R):
        row, r_mask, mask = token_rows(b, p, r0, N_TOK, c_mask, ROWS_PER_PROG, BLOCK_R)
        # the LayerNorm-modulate's backward (yn = LN(y)), then the residual stream's other gradient
        dm, yn, dx = ln_modulate_bwd_rows(DM, Y, MEAN, RSTD, row, r_mask, mask, col, sc1, D,
                                          stride_dmm, stride_dmd, stride_ym, stride_yd)
        acc_dshift += tl.sum(dm, axis=0)
        acc_dscale += tl.sum(dm * yn, axis=0)
        if HAS_DY:
            dx += tl.load(DY + row[:, None] * stride_dym + col[None, :] * stride_dyd, mask=mask,
                          other=0.0).to(tl.float32)
        f = tl.load(F + row[:, None] * stride_fm + col[None, :] * stride_fd, mask=mask, other=0.0).to(tl.float32)
        acc_dg += tl.sum(dx * f, axis=0)
        out = row[:, None] * D + col[None, :]
        tl.store(DX + out, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DF + out, (g[None, :] * dx).to(DF.dtype.element_ty), mask=mask)
    part = (b * P + p) * D + col
    tl.store(DSHIFT_PART + part, acc_dshift, mask=c_mask)
    tl.store(DSCALE_PART + part, acc_dscale, mask=c_mask)
    tl.store(DG_PART + part, acc_dg, mask=c_mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
# Tiles: the LayerNorm-modulate forward's (rownorm.tile_rows), for the forward and for each step of the
# backward's token loop, which holds more live tiles than LN-modulate's (4-row steps there).
def _gated_residual_ln_bwd_launch(B: int, N: int, block_d: int, cuda: bool) -> Tuple[int, int]:
    """(rows per step, tokens per program) of the backward: at least 8 tokens per program on CUDA, as
    LN-modulate's (the partial sums then take 3/4 of an activation's bytes), more past ~16 k tiles."""
    block_r = tile_rows(block_d)
    min_steps = triton.cdiv(8, block_r) if cuda else 1
    return block_r, block_r * max(min_steps, steps_per_program(triton.cdiv(B * N, block_r)))


def _check_gated_residual_ln(op: str, x, gate, f, shift, scale, x_dot, gate_dot, f_dot, shift_dot, scale_dot,
                             eps) -> float:
    check_gated_residual(op, x, gate, f, x_dot, gate_dot, f_dot)
    return check_ln_modulate(op, x, shift, scale, x_dot, shift_dot, scale_dot, eps)


def gated_residual_ln_fwd(x, gate, f, shift, scale, x_dot=None, gate_dot=None, f_dot=None, shift_dot=None,
                          scale_dot=None, eps: float = 1e-6, check: bool = True):
    """Launch the forward kernel; returns (y, ẏ, m, ṁ, mean, rstd): four (B, N, D) tensors in x's dtype
    (contiguous) and the fp32 (B·N,) statistics of y. Without the tangents (all five None) the kernel
    runs primal only (HAS_TANGENT=False) and ẏ, ṁ are None. Inputs are read in place through their
    strides. ``check=False``: the caller has validated the inputs."""
    tangents = (x_dot, gate_dot, f_dot, shift_dot, scale_dot)
    has_tangent = any(t is not None for t in tangents)
    if check:
        eps = _check_gated_residual_ln("gated_residual_ln_jvp" if has_tangent else "gated_residual_ln",
                                       x, gate, f, shift, scale, *tangents, eps)
    B, N, D = x.shape
    x2, f2 = rows(x, D), rows(f, D)
    M = x2.shape[0]
    y, m = torch.empty(B, N, D, dtype=x.dtype, device=x.device), torch.empty(B, N, D, dtype=x.dtype, device=x.device)
    if has_tangent:
        xd2, fd2, y_dot, m_dot = rows(x_dot, D), rows(f_dot, D), torch.empty_like(y), torch.empty_like(m)
    else:  # never read or written (HAS_TANGENT=False)
        xd2, gate_dot, fd2, shift_dot, scale_dot, y_dot, m_dot = x2, gate, f2, shift, scale, y, m
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if M > 0:
        block_d = next_pow2(D)
        block_r = tile_rows(block_d)
        _gated_residual_ln_fwd_kernel[(triton.cdiv(M, block_r),)](
            x2, gate, f2, xd2, gate_dot, fd2, shift, scale, shift_dot, scale_dot,
            y, y_dot, m, m_dot, mean, rstd, M, D, N, float(eps),
            x2.stride(0), x2.stride(1), gate.stride(0), gate.stride(1), f2.stride(0), f2.stride(1),
            xd2.stride(0), xd2.stride(1), gate_dot.stride(0), gate_dot.stride(1), fd2.stride(0), fd2.stride(1),
            shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1),
            shift_dot.stride(0), shift_dot.stride(1), scale_dot.stride(0), scale_dot.stride(1),
            HAS_TANGENT=has_tangent, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=row_num_warps(block_d, block_r))
    if not has_tangent:
        return y, None, m, None, mean, rstd
    return y, y_dot, m, m_dot, mean, rstd


def gated_residual_ln_bwd(dm, dy: Optional[torch.Tensor], y, f, gate, scale, mean, rstd):
    """Launch the backward kernel; returns (dx, df, dgate, dshift, dscale): dx = dy + the LayerNorm's
    share (dy = None: zero), df = g ⊙ dx (dtype of y), and the three (B, D) sums over the tokens in the
    dtype of the modulation (fp32 partial sums per (batch, token block), then one torch sum each)."""
    B, N, D = y.shape
    dm2, y2, f2 = rows(dm, D), rows(y, D), rows(f, D)
    dy2 = rows(dy, D) if dy is not None else dm2  # dm2: never read (HAS_DY=False)
    dx, df = torch.empty(B, N, D, dtype=y.dtype, device=y.device), torch.empty(B, N, D, dtype=y.dtype, device=y.device)
    block_d = next_pow2(D)
    block_r, rows_per_prog = _gated_residual_ln_bwd_launch(B, N, block_d, y.is_cuda)
    P = triton.cdiv(N, rows_per_prog) if N else 0
    parts = [torch.empty(B, P, D, dtype=torch.float32, device=y.device) for _ in range(3)]  # dshift, dscale, dg
    if B * N > 0:
        _gated_residual_ln_bwd_kernel[(B, P)](
            dm2, dy2, y2, f2, gate, scale, mean, rstd, dx, df, *parts, D, N, P,
            dm2.stride(0), dm2.stride(1), dy2.stride(0), dy2.stride(1), y2.stride(0), y2.stride(1),
            f2.stride(0), f2.stride(1), gate.stride(0), gate.stride(1), scale.stride(0), scale.stride(1),
            HAS_DY=dy is not None, ROWS_PER_PROG=rows_per_prog, BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=row_num_warps(block_d, block_r))
    dshift, dscale, dgate = (part.sum(1).to(scale.dtype) for part in parts)
    return dx, df, dgate, dshift, dscale


# torch.library custom ops: one opaque node each for torch.compile; register_fake gives the shapes.
@kernel_op("meanflow_fast::gated_residual_ln_fwd")
def gated_residual_ln_fwd_op(x: torch.Tensor, gate: torch.Tensor, f: torch.Tensor, shift: torch.Tensor,
                             scale: torch.Tensor, x_dot: torch.Tensor, gate_dot: torch.Tensor, f_dot: torch.Tensor,
                             shift_dot: torch.Tensor, scale_dot: torch.Tensor, eps: float
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor]:
    return gated_residual_ln_fwd(x, gate, f, shift, scale, x_dot, gate_dot, f_dot, shift_dot, scale_dot, eps,
                                 check=False)


@gated_residual_ln_fwd_op.register_fake
def _gated_residual_ln_fwd_fake(x, gate, f, shift, scale, x_dot, gate_dot, f_dot, shift_dot, scale_dot, eps):
    _check_gated_residual_ln("gated_residual_ln_jvp", x, gate, f, shift, scale, x_dot, gate_dot, f_dot, shift_dot,
                             scale_dot, eps)
    B, N, D = x.shape
    stat = x.new_empty(B * N, dtype=torch.float32)
    return (*(x.new_empty(B, N, D) for _ in range(4)), stat, torch.empty_like(stat))


@kernel_op("meanflow_fast::gated_residual_ln_primal_fwd")
def gated_residual_ln_primal_fwd_op(x: torch.Tensor, gate: torch.Tensor, f: torch.Tensor, shift: torch.Tensor,
                                    scale: torch.Tensor, eps: float
                                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, _, m, _, mean, rstd = gated_residual_ln_fwd(x, gate, f, shift, scale, eps=eps, check=False)
    return y, m, mean, rstd


@gated_residual_ln_primal_fwd_op.register_fake
def _gated_residual_ln_primal_fwd_fake(x, gate, f, shift, scale, eps):
    _check_gated_residual_ln("gated_residual_ln", x, gate, f, shift, scale, None, None, None, None, None, eps)
    B, N, D = x.shape
    stat = x.new_empty(B * N, dtype=torch.float32)
    return x.new_empty(B, N, D), x.new_empty(B, N, D), stat, torch.empty_like(stat)


@kernel_op("meanflow_fast::gated_residual_ln_bwd")
def gated_residual_ln_bwd_op(dm: torch.Tensor, dy: Optional[torch.Tensor], y: torch.Tensor, f: torch.Tensor,
                             gate: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return gated_residual_ln_bwd(dm, dy, y, f, gate, scale, mean, rstd)


@gated_residual_ln_bwd_op.register_fake
def _gated_residual_ln_bwd_fake(dm, dy, y, f, gate, scale, mean, rstd):
    return (y.new_empty(y.shape), y.new_empty(y.shape), *(scale.new_empty(scale.shape) for _ in range(3)))


# ---------------------------------------------------------------------------------------------
# autograd.Functions
# ---------------------------------------------------------------------------------------------
def _gated_residual_ln_backward(ctx, dy, dm):
    """(dx, dgate, df, dshift, dscale) from the saved (y, f, g, scale, μ, 1/σ): one Triton pass
    (``gated_residual_ln_bwd``) when m took part in the loss, the gated residual's backward alone when
    only y did."""
    y, f, gate, scale, mean, rstd = ctx.saved_tensors
    dx = df = dgate = dshift = dscale = None
    if dm is not None:
        dx, df, dgate, dshift, dscale = gated_residual_ln_bwd_op(dm, dy, y, f, gate, scale, mean, rstd)
    elif dy is not None:  # m took no part in the loss: the residual's backward alone
        dx = dy
        df, dgate = gated_residual_bwd_op(dy, gate, f)
    return tuple(g if n else None for g, n in zip((dx, dgate, df, dshift, dscale), ctx.needs_input_grad))


@jvp_function(jvp_inputs=5)
class GatedResidualLnFunction(KernelFunction):
    """(x, g, f, shift, scale) → (y, m, mean, rstd), primal only, in the torch.func form (the row
    statistics are outputs so that setup_context can save them; ``gated_residual_ln`` drops them). Saves
    what the dual Function saves; the same backward. ``jvp`` runs the dual kernel (gate, shift and scale
    tangents included), so torch.func.jvp over a model calling ``gated_residual_ln`` stays fused."""

    @staticmethod
    def forward(x, gate, f, shift, scale, eps):
        return gated_residual_ln_primal_fwd_op(x, gate, f, shift, scale, float(eps))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, gate, f, _, scale, eps = inputs
        y, _, mean, rstd = output
        ctx.save_for_backward(y, f, gate, scale, mean, rstd)
        ctx.eps = float(eps)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for an unused y or m

    @staticmethod
    @backward_once
    def backward(ctx, dy, dm, _dmean, _drstd):
        return (*_gated_residual_ln_backward(ctx, dy, dm), None)

    @staticmethod
    def jvp(ctx, x_t, gate_t, f_t, shift_t, scale_t, _eps_t):
        x, gate, f, shift, scale = ctx.saved_tensors
        tangents = (zeros_if_none(x_t, x), zeros_if_none(gate_t, gate), zeros_if_none(f_t, f),
                    zeros_if_none(shift_t, shift), zeros_if_none(scale_t, scale))
        _check_gated_residual_ln("gated_residual_ln_jvp", x, gate, f, shift, scale, *tangents, ctx.eps)
        _, y_dot, _, m_dot, _, _ = gated_residual_ln_fwd_op(x, gate, f, shift, scale, *tangents, ctx.eps)
        return y_dot, m_dot, None, None


GatedResidualLnFunctionWithoutJvp = GatedResidualLnFunction.without_jvp


class GatedResidualLnJvpFunction(KernelFunction):
    """(x, g, f, shift, scale, ẋ, ġ, ḟ, shifṫ, scalė) → (y, ẏ, m, ṁ). Saves y, f, g, scale and the fp32
    row statistics: what the two ops apart save (g, f; y, scale, μ, 1/σ), nothing of the tangent stream;
    ẏ and ṁ are non-differentiable. Backward: one Triton pass (``gated_residual_ln_bwd``). The torch.func
    form: the statistics are outputs too (``gated_residual_ln_jvp`` drops them)."""

    @staticmethod
    def forward(x, gate, f, shift, scale, x_dot, gate_dot, f_dot, shift_dot, scale_dot, eps):
        return gated_residual_ln_fwd_op(x, gate, f, shift, scale, x_dot, gate_dot, f_dot, shift_dot, scale_dot,
                                        float(eps))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, gate, f, _, scale = inputs[:5]
        y, y_dot, _, m_dot, mean, rstd = output
        ctx.save_for_backward(y, f, gate, scale, mean, rstd)
        ctx.mark_non_differentiable(y_dot, m_dot, mean, rstd)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for ẏ, ṁ, or an unused y or m

    @staticmethod
    @backward_once
    def backward(ctx, dy, _dy_dot, dm, _dm_dot, _dmean, _drstd):
        return (*_gated_residual_ln_backward(ctx, dy, dm), None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------
def gated_residual_ln(x, gate, f, shift, scale, eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, m): the gated residual y = x + g ⊙ f and the LayerNorm-modulate m of y in one Triton kernel,
    primal only (switch ``residual_ln="apart"``: ``gated_residual`` then ``ln_modulate``); both
    differentiable (one Triton backward). Same signature and contract as ``gated_residual_ln_ref``."""
    if config.get("residual_ln") == "apart":
        y = gated_residual(x, gate, f)
        return y, ln_modulate(y, shift, scale, eps)
    eps = _check_gated_residual_ln("gated_residual_ln", x, gate, f, shift, scale, None, None, None, None, None, eps)
    fn = pick_function(GatedResidualLnFunction, GatedResidualLnFunctionWithoutJvp)
    y, m, _, _ = fn.apply(x, gate, f, shift, scale, eps)
    return y, m


def gated_residual_ln_jvp(x, gate, f, shift, scale, x_dot, gate_dot, f_dot, shift_dot, scale_dot,
                          eps: float = 1e-6):
    """(y, ẏ, m, ṁ): the gated residual y = x + g ⊙ f and the LayerNorm-modulate m of y, with their
    tangents, in one Triton kernel (switch ``residual_ln="apart"``: the two ops' kernels one after the
    other). y and m are differentiable, ẏ and ṁ carry no autograd graph. Same signature and contract as
    ``gated_residual_ln_jvp_ref``."""
    if config.get("residual_ln") == "apart":
        y, y_dot = gated_residual_jvp(x, gate, f, x_dot, gate_dot, f_dot)
        return (y, y_dot, *ln_modulate_jvp(y, shift, scale, y_dot, shift_dot, scale_dot, eps))
    eps = _check_gated_residual_ln("gated_residual_ln_jvp", x, gate, f, shift, scale, x_dot, gate_dot, f_dot,
                                   shift_dot, scale_dot, eps)
    return GatedResidualLnJvpFunction.apply(x, gate, f, shift, scale, x_dot, gate_dot, f_dot, shift_dot, scale_dot,
                                            eps)[:4]
