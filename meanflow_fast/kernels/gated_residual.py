"""Gated residual x' = x + g ⊙ f with its tangent ẋ' = ẋ + ġ ⊙ f + g ⊙ ḟ (docs/DESIGN.md, JVP rules:
gated residual).

x, f and their tangents: (B, N, D); the gate g and ġ: (B, D), broadcast over the N tokens.

The Triton path is one elementwise kernel for both streams (five (B, N, D) reads, two writes, math in
fp32) and one backward kernel for the primal stream: df = g ⊙ dy and per-block partial sums of
dg = Σ_N dy ⊙ f in one pass (dx = dy needs no kernel). The same forward kernel with HAS_TANGENT=False is
the primal-only op ``gated_residual`` of the DiT's plain forward (three reads, one write, instead of
eager torch's two passes g ⊙ f and x + (g ⊙ f) with a (B, N, D) temporary; same backward).
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from .launch import (KernelFunction, backward_once, check_shape, check_tangents_together, check_tensors,
                     elementwise_tiles, jvp_function, kernel_op, pick_function, rows, steps_per_program,
                     zeros_if_none)


# ---------------------------------------------------------------------------------------------
# Reference (pure torch)
# ---------------------------------------------------------------------------------------------
def gated_residual_ref(x, gate, f) -> torch.Tensor:
    return x + gate.unsqueeze(1) * f


def gated_residual_jvp_ref(x, gate, f, x_dot, gate_dot, f_dot) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x', ẋ'); x' is differentiable, ẋ' carries no autograd graph."""
    y = x + gate.unsqueeze(1) * f
    with torch.no_grad():
        y_dot = x_dot + gate_dot.unsqueeze(1) * f + gate.unsqueeze(1) * f_dot
    return y, y_dot


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _gated_residual_fwd_kernel(
    X,              # (M, D) residual stream rows (M = B·N), any strides
    G,              # (B, D) gate, any strides
    F,              # (M, D) branch output f, any strides
    XD,             # (M, D) tangent of x (XD, GD, FD not read when HAS_TANGENT is False)
    GD,             # (B, D) tangent of the gate
    FD,             # (M, D) tangent of f
    Y,              # (M, D) out: x + g ⊙ f, contiguous
    YD,             # (M, D) out: ẋ + ġ ⊙ f + g ⊙ ḟ, contiguous (not written when HAS_TANGENT is False)
    n_rows,         # M
    D,              # features per row
    N_TOK,          # tokens per batch element: row r uses the gate of batch r // N_TOK
    stride_xm, stride_xd,        # strides of X
    stride_gb, stride_gd,        # strides of G
    stride_fm, stride_fd,        # strides of F
    stride_xdm, stride_xdd,      # strides of XD
    stride_gdb, stride_gdd,      # strides of GD
    stride_fdm, stride_fdd,      # strides of FD
    HAS_TANGENT: tl.constexpr,   # False: primal only (Y); the tangent loads, math and store are compiled out
    BLOCK_R: tl.constexpr,       # rows per program
    BLOCK_D: tl.constexpr,       # features per program
):
    row = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    col = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    mask = (row < n_rows)[:, None] & (col < D)[None, :]
    b = row // N_TOK
    x = tl.load(X + row[:, None] * stride_xm + col[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + b[:, None] * stride_gb + col[None, :] * stride_gd, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(F + row[:, None] * stride_fm + col[None, :] * stride_fd, mask=mask, other=0.0).to(tl.float32)
    out = row[:, None] * D + col[None, :]
    tl.store(Y + out, (x + g * f).to(Y.dtype.element_ty), mask=mask)
    if HAS_TANGENT:
        xd = tl.load(XD + row[:, None] * stride_xdm + col[None, :] * stride_xdd, mask=mask, other=0.0).to(tl.float32)
        gd = tl.load(GD + b[:, None] * stride_gdb + col[None, :] * stride_gdd, mask=mask, other=0.0).to(tl.float32)
        fd = tl.load(FD + row[:, None] * stride_fdm + col[None, :] * stride_fdd, mask=mask, other=0.0).to(tl.float32)
        tl.store(YD + out, (xd + gd * f + g * fd).to(YD.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(
    DY,             # (M, D) gradient of y, any strides
    G,              # (B, D) gate, any strides
    F,              # (M, D) saved branch output f, any strides
    DF,             # (M, D) out: g ⊙ dy, contiguous
    DG_PART,        # (B, P, D) out, fp32: Σ dy ⊙ f over this program's tokens
    D,              # features per row
    N_TOK,          # tokens per batch element
    P,              # token blocks per batch element = cdiv(N_TOK, ROWS_PER_PROG)
    stride_dym, stride_dyd,      # strides of DY
    stride_gb, stride_gd,        # strides of G
    stride_fm, stride_fd,        # strides of F
    ROWS_PER_PROG: tl.constexpr, # tokens per program (a multiple of BLOCK_R)
    BLOCK_R: tl.constexpr,       # rows per step of the token loop
    BLOCK_D: tl.constexpr,       # features per program
):
    # Grid (B, P, cdiv(D, BLOCK_D)): a program stays inside one batch element, so its partial sum of
    # dg fills one (b, p) slot: a deterministic two-stage reduction, no atomics.
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    col = (tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    c_mask = col < D
    g = tl.load(G + b * stride_gb + col * stride_gd, mask=c_mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r0 in range(0, ROWS_PER_PROG, BLOCK_R):
        tok = p * ROWS_PER_PROG + r0 + tl.arange(0, BLOCK_R)
        row = b * N_TOK + tok
        mask = (tok < N_TOK)[:, None] & c_mask[None, :]
        dy = tl.load(DY + row[:, None] * stride_dym + col[None, :] * stride_dyd, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(F + row[:, None] * stride_fm + col[None, :] * stride_fd, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(dy * f, axis=0)
        tl.store(DF + row[:, None] * D + col[None, :], (g[None, :] * dy).to(DF.dtype.element_ty), mask=mask)
    tl.store(DG_PART + (b * P + p) * D + col, acc, mask=c_mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
# Tiles: ``elementwise_tiles`` (8 rows × 256 columns on CUDA); at DiT-B/2 batch 128 (M = 32768,
# D = 768) the forward launches 4096 × 3 programs.

def check_gated_residual(op: str, x, gate, f, x_dot, gate_dot, f_dot) -> None:
    """Validate a call of ``op`` (``gated_residual`` without the tangents, ``gated_residual_jvp`` with all
    three)."""
    tangents = {"x_dot": x_dot, "gate_dot": gate_dot, "f_dot": f_dot}
    has_tangent = check_tangents_together(op, tangents)
    check_tensors(op, {"x": x, "gate": gate, "f": f, **tangents})
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be 3-D (B, N, D), got shape {tuple(x.shape)}")
    B, _, D = x.shape
    check_shape(op, "f", f, x.shape, "the branch output has x's shape")
    check_shape(op, "gate", gate, (B, D), "(B, D) of x = (B, N, D), broadcast over the N tokens")
    if has_tangent:
        check_shape(op, "x_dot", x_dot, x.shape, "the tangent of x has x's shape")
        check_shape(op, "f_dot", f_dot, x.shape, "the tangent of f has x's shape")
        check_shape(op, "gate_dot", gate_dot, (B, D), "the tangent of gate has gate's shape")


def gated_residual_fwd(x, gate, f, x_dot=None, gate_dot=None, f_dot=None, check: bool = True):
    """Launch the forward kernel; returns (y, ẏ), (B, N, D) in x's dtype, contiguous. Without the tangents
    (all three None) the kernel runs primal only (HAS_TANGENT=False) and ẏ is None. Inputs are read in
    place through their strides (the gate is typically a non-contiguous ``chunk`` view).
    ``check=False``: the caller has validated the inputs."""
    has_tangent = x_dot is not None or gate_dot is not None or f_dot is not None
    if check:
        check_gated_residual("gated_residual_jvp" if has_tangent else "gated_residual",
                             x, gate, f, x_dot, gate_dot, f_dot)
    B, N, D = x.shape
    x2, f2 = rows(x, D), rows(f, D)
    M = x2.shape[0]
    y = torch.empty(B, N, D, dtype=x.dtype, device=x.device)
    if has_tangent:
        xd2, fd2, y_dot = rows(x_dot, D), rows(f_dot, D), torch.empty_like(y)
    else:  # never read or written (HAS_TANGENT=False)
        xd2, gate_dot, fd2, y_dot = x2, gate, f2, y
    if M > 0 and D > 0:
        block_r, block_d = elementwise_tiles(D, x.is_cuda)
        grid = (triton.cdiv(M, block_r), triton.cdiv(D, block_d))
        _gated_residual_fwd_kernel[grid](
            x2, gate, f2, xd2, gate_dot, fd2, y, y_dot, M, D, N,
            x2.stride(0), x2.stride(1), gate.stride(0), gate.stride(1), f2.stride(0), f2.stride(1),
            xd2.stride(0), xd2.stride(1), gate_dot.stride(0), gate_dot.stride(1), fd2.stride(0), fd2.stride(1),
            HAS_TANGENT=has_tangent, BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=8 if block_r * block_d >= 2048 else 4)
    return y, (y_dot if has_tangent else None)


def gated_residual_bwd(dy, gate, f):
    """Launch the backward kernel; returns (df, dgate): df = g ⊙ dy in f's dtype, dgate = Σ_N dy ⊙ f
    in the gate's dtype (fp32 partial sums per (batch, token block), then one torch sum)."""
    B, N, D = f.shape
    dy2, f2 = rows(dy, D), rows(f, D)
    df = torch.empty(B, N, D, dtype=f.dtype, device=f.device)
    block_r, block_d = elementwise_tiles(D, f.is_cuda)
    # one tile per program at DiT sizes (B/2 batch 128: 128 × 32 × 3 programs), as the forward
    rows_per_prog = block_r * steps_per_program(triton.cdiv(B * N, block_r) * triton.cdiv(D, block_d))
    P = triton.cdiv(N, rows_per_prog) if N else 0
    dg_part = torch.empty(B, P, D, dtype=torch.float32, device=f.device)
    if B * N > 0 and D > 0:
        _gated_residual_bwd_kernel[(B, P, triton.cdiv(D, block_d))](
            dy2, gate, f2, df, dg_part, D, N, P,
            dy2.stride(0), dy2.stride(1), gate.stride(0), gate.stride(1), f2.stride(0), f2.stride(1),
            ROWS_PER_PROG=rows_per_prog, BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=8 if block_r * block_d >= 2048 else 4)
    return df, dg_part.sum(1).to(gate.dtype)


# torch.library custom ops: one opaque node each for torch.compile; register_fake gives the shapes.
@kernel_op("meanflow_fast::gated_residual_fwd")
def gated_residual_fwd_op(x: torch.Tensor, gate: torch.Tensor, f: torch.Tensor, x_dot: torch.Tensor,
                          gate_dot: torch.Tensor, f_dot: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return gated_residual_fwd(x, gate, f, x_dot, gate_dot, f_dot, check=False)


@gated_residual_fwd_op.register_fake
def _gated_residual_fwd_fake(x, gate, f, x_dot, gate_dot, f_dot):
    check_gated_residual("gated_residual_jvp", x, gate, f, x_dot, gate_dot, f_dot)
    return x.new_empty(x.shape), x.new_empty(x.shape)


@kernel_op("meanflow_fast::gated_residual_primal_fwd")
def gated_residual_primal_fwd_op(x: torch.Tensor, gate: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return gated_residual_fwd(x, gate, f, check=False)[0]


@gated_residual_primal_fwd_op.register_fake
def _gated_residual_primal_fwd_fake(x, gate, f):
    check_gated_residual("gated_residual", x, gate, f, None, None, None)
    return x.new_empty(x.shape)


@kernel_op("meanflow_fast::gated_residual_bwd")
def gated_residual_bwd_op(dy: torch.Tensor, gate: torch.Tensor, f: torch.Tensor
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    return gated_residual_bwd(dy, gate, f)


@gated_residual_bwd_op.register_fake
def _gated_residual_bwd_fake(dy, gate, f):
    return f.new_empty(f.shape), gate.new_empty(gate.shape)


# ---------------------------------------------------------------------------------------------
# autograd.Function
# ---------------------------------------------------------------------------------------------
def _gated_residual_backward(ctx, dy):
    """(dx, dgate, df) of y = x + g ⊙ f from the saved (g, f): dx = dy (no kernel), df and dg in one
    Triton pass (torch would need a g ⊙ dy pass plus a dy ⊙ f temporary and a reduction over it)."""
    if dy is None:  # y took no part in the loss (gradients are not materialised as zeros)
        return None, None, None
    gate, f = ctx.saved_tensors
    need = ctx.needs_input_grad
    df = dgate = None
    if need[1] or need[2]:
        df, dgate = gated_residual_bwd_op(dy, gate, f)
    return dy if need[0] else None, dgate if need[1] else None, df if need[2] else None


@jvp_function(jvp_inputs=3)
class GatedResidualFunction(KernelFunction):
    """(x, g, f) → x + g ⊙ f, primal only, in the torch.func form. Saves g and f; the backward of the
    dual op. ``jvp`` runs the dual kernel (ẋ + ġ ⊙ f + g ⊙ ḟ), so torch.func.jvp over a model calling
    ``gated_residual`` stays on the fused kernels."""

    @staticmethod
    def forward(x, gate, f):
        return gated_residual_primal_fwd_op(x, gate, f)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, gate, f = inputs
        ctx.save_for_backward(gate, f)
        ctx.set_materialize_grads(False)

    @staticmethod
    @backward_once
    def backward(ctx, dy):
        return _gated_residual_backward(ctx, dy)

    @staticmethod
    def jvp(ctx, x_t, gate_t, f_t):
        x, gate, f = ctx.saved_tensors
        tangents = zeros_if_none(x_t, x), zeros_if_none(gate_t, gate), zeros_if_none(f_t, f)
        check_gated_residual("gated_residual_jvp", x, gate, f, *tangents)
        return gated_residual_fwd_op(x, gate, f, *tangents)[1]


GatedResidualFunctionWithoutJvp = GatedResidualFunction.without_jvp


class GatedResidualJvpFunction(KernelFunction):
    """(x, g, f, ẋ, ġ, ḟ) → (x + g ⊙ f, ẋ + ġ ⊙ f + g ⊙ ḟ). Saves g and f (what torch's own g ⊙ f
    saves); nothing of the tangent stream, and no zero-filled gradient for ẏ is made. Backward:
    ``_gated_residual_backward``."""

    @staticmethod
    def forward(x, gate, f, x_dot, gate_dot, f_dot):
        return gated_residual_fwd_op(x, gate, f, x_dot, gate_dot, f_dot)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[1:3])  # gate, f
        ctx.mark_non_differentiable(output[1])  # ẏ
        ctx.set_materialize_grads(False)

    @staticmethod
    @backward_once
    def backward(ctx, dy, _dy_dot):
        return _gated_residual_backward(ctx, dy) + (None, None, None)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------
def gated_residual(x, gate, f) -> torch.Tensor:
    """x + g ⊙ f (g (B, D) broadcast over the N tokens) in one Triton kernel, primal only; differentiable
    (Triton backward). Same signature and contract as ``gated_residual_ref``."""
    check_gated_residual("gated_residual", x, gate, f, None, None, None)
    return pick_function(GatedResidualFunction, GatedResidualFunctionWithoutJvp).apply(x, gate, f)


def gated_residual_jvp(x, gate, f, x_dot, gate_dot, f_dot) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, ẏ) = (x + g ⊙ f, ẋ + ġ ⊙ f + g ⊙ ḟ) in one Triton kernel; y is differentiable, ẏ carries no
    autograd graph. Same signature and contract as ``gated_residual_jvp_ref``."""
    check_gated_residual("gated_residual_jvp", x, gate, f, x_dot, gate_dot, f_dot)
    return GatedResidualJvpFunction.apply(x, gate, f, x_dot, gate_dot, f_dot)
