"""QK-norm + RoPE of the iMF attention: per-head RMSNorm of q and of k (each with its own (D,) weight),
then 1-D RoPE, with the tangents (docs/DESIGN.md, "8 Improved MeanFlow (iMF): the model", JVP rules:
QK-norm + RoPE):

    r = (mean(x²) + eps)^(−1/2),  n = x·r,  y = rope(n ⊙ w)
    ẏ = rope(w ⊙ r·(ẋ − n·mean(n ⊙ ẋ)))                                     (weights constant)

RoPE rotates each channel pair (x₂ᵢ, x₂ᵢ₊₁) of token n by the angle of ``cos``/``sin`` row n
(``rope_cos_sin``). q, k and their tangents: (B, N, H, D), any strides (the iMF model's
``unflatten`` views of its q and k projections); weights (D,); cos and sin (N, D/2), fp32 or the inputs'
dtype. D must be even. The math is ``qk_norm_rope_ref`` / ``qk_norm_rope_jvp_ref``, with
norm and rotation fused in fp32 (the references round the normed values to the input dtype between the
two in fp16/bf16).

Layout: the outputs have the references' shape (B, N, H, D) but are stored as (B, H, N, D), the layout of
the attention kernels (kernels/attention.py): the model's ``q.transpose(1, 2)`` is then a contiguous
(B, H, N, D) tensor, the transpose done by the stores of this kernel at no cost.

The Triton path is one row kernel over the B·N·H (token, head) rows, q's and k's rows of one program
sharing their cos/sin loads; the tangents ride in the same pass (HAS_TANGENT) or are compiled out (the
primal-only op of the plain forward). The backward is one Triton kernel through the primal stream only:
dx from the recomputed row statistic (no statistics are saved: x is read anyway), and fp32 partial sums
of the two weight gradients per program, summed in torch (deterministic).
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from .launch import (KernelFunction, backward_once, check_shape, check_tangents_together, check_tensors,
                     jvp_function, kernel_op, next_pow2, pick_function, steps_per_program, zeros_if_none)
from .reference import compute_dtype
from .rmsnorm import rms_norm_jvp_ref, rms_norm_ref
from .rownorm import row_num_warps, tile_rows

__all__ = ["qk_norm_rope", "qk_norm_rope_jvp", "qk_norm_rope_ref", "qk_norm_rope_jvp_ref", "rope_cos_sin", "rope_ref"]


# ---------------------------------------------------------------------------------------------
# Reference (pure torch): RoPE, then QK-norm + RoPE from RMSNorm's reference
# ---------------------------------------------------------------------------------------------
def rope_cos_sin(num_tokens: int, head_dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32,
                 device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles n·θ^(−2i/head_dim), (num_tokens, head_dim/2), for positions n = 0, 1, …
    The angles are formed in ``dtype``: fp32 gives the official implementation's table bit for bit."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE (pairs of channels), got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=dtype, device=device) / head_dim))
    angles = torch.outer(torch.arange(num_tokens, dtype=dtype, device=device), inv_freq)
    return torch.cos(angles), torch.sin(angles)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, N, H, D), cos and sin (N, D/2): (x₂ᵢ + i·x₂ᵢ₊₁)·(cos + i·sin) for every pair. Linear in x, so
    it is also its own tangent rule."""
    dt = compute_dtype(x.dtype)
    pairs = x.to(dt).unflatten(-1, (-1, 2))          # (B, N, H, D/2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    c, s = cos.to(dt)[:, None, :], sin.to(dt)[:, None, :]  # (N, 1, D/2): broadcast over heads
    return torch.stack([re * c - im * s, re * s + im * c], dim=-1).flatten(-2).to(x.dtype)


def qk_norm_rope_ref(q, k, q_weight, k_weight, cos, sin, eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, N, H, D), weights (D,), cos and sin (N, D/2) → (q', k'), same layout."""
    return (rope_ref(rms_norm_ref(q, q_weight, eps), cos, sin),
            rope_ref(rms_norm_ref(k, k_weight, eps), cos, sin))


def qk_norm_rope_jvp_ref(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot,
                         eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q', q̇', k', k̇'): the RMSNorm rule, then RoPE on both streams. Primals differentiable, tangents
    without an autograd graph."""
    qn, qn_dot = rms_norm_jvp_ref(q, q_weight, q_dot, eps)
    kn, kn_dot = rms_norm_jvp_ref(k, k_weight, k_dot, eps)
    with torch.no_grad():
        q_dot, k_dot = rope_ref(qn_dot, cos, sin), rope_ref(kn_dot, cos, sin)
    return rope_ref(qn, cos, sin), q_dot, rope_ref(kn, cos, sin), k_dot


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _rotate(y, c, s, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """RoPE of (BLOCK_R, 2·BLOCK_P) fp32 rows: each pair (a, b) of adjacent columns → (a·c − b·s, a·s + b·c),
    c and s (BLOCK_R, BLOCK_P). With −s it is the inverse (transposed) rotation."""
    a, b = tl.split(tl.reshape(y, (BLOCK_R, BLOCK_P, 2)))
    return tl.reshape(tl.join(a * c - b * s, a * s + b * c), (BLOCK_R, 2 * BLOCK_P))


@triton.jit
def _row_index(row, N, H):
    """(b, n, h) of rows ordered (batch, token, head), as a (B, N, H, D) tensor's rows are."""
    h = row % H
    t = row // H
    return t // N, t % N, h


@triton.jit
def _norm_rope_rows(X, XD, W, OUT, OUT_D, b, n, h, mask, col, c, s, o_off, D, eps,
                    sxb, sxn, sxh, sxd, sxdb, sxdn, sxdh, sxdd, sw,
                    HAS_TANGENT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """One tensor's rows (q or k): y = rope(n ⊙ w) and (HAS_TANGENT)
    ẏ = rope(w ⊙ r·(ẋ − n·mean(n ⊙ ẋ))), stored at ``o_off`` + col (the (B, H, N, D) layout)."""
    x = tl.load(X + (b * sxb + n * sxn + h * sxh)[:, None] + col[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    nx = x * r[:, None]                                        # 0 outside the row
    w = tl.load(W + col * sw, mask=col < D, other=0.0).to(tl.float32)[None, :]
    y = _rotate(nx * w, c, s, BLOCK_R, BLOCK_P)
    tl.store(OUT + o_off[:, None] + col[None, :], y.to(OUT.dtype.element_ty), mask=mask)
    if HAS_TANGENT:
        xd = tl.load(XD + (b * sxdb + n * sxdn + h * sxdh)[:, None] + col[None, :] * sxdd,
                     mask=mask, other=0.0).to(tl.float32)
        mu = tl.sum(nx * xd, axis=1) / D
        yd = _rotate((xd - nx * mu[:, None]) * r[:, None] * w, c, s, BLOCK_R, BLOCK_P)
        tl.store(OUT_D + o_off[:, None] + col[None, :], yd.to(OUT_D.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_fwd_kernel(
    Q, K,           # (B, N, H, D) primal rows, any strides
    QD, KD,         # (B, N, H, D) tangents, any strides (not read when HAS_TANGENT is False)
    QW, KW,         # (D,) RMSNorm weights, any stride
    COS, SIN,       # (N, D/2) RoPE table, any strides
    QO, KO,         # out: (B, H, N, D) contiguous storage
    QOD, KOD,       # out: tangents, same layout (not written when HAS_TANGENT is False)
    n_rows,         # M = B·N·H
    N, H, D,        # tokens, heads, head dim (even)
    eps,
    sqb, sqn, sqh, sqd,          # strides of Q
    skb, skn, skh, skd,          # strides of K
    sqdb, sqdn, sqdh, sqdd,      # strides of QD
    skdb, skdn, skdh, skdd,      # strides of KD
    sqw, skw,                    # strides of QW, KW
    scn, scp, ssn, ssp,          # strides of COS, SIN
    HAS_TANGENT: tl.constexpr,
    BLOCK_R: tl.constexpr,       # rows per program
    BLOCK_P: tl.constexpr,       # next power of two ≥ D/2 (pairs per row; a whole row per tile)
):
    row = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    col = tl.arange(0, 2 * BLOCK_P)
    pair = tl.arange(0, BLOCK_P)
    r_mask = row < n_rows
    mask = r_mask[:, None] & (col < D)[None, :]
    p_mask = r_mask[:, None] & (pair < D // 2)[None, :]
    b, n, h = _row_index(row, N, H)
    c = tl.load(COS + n[:, None] * scn + pair[None, :] * scp, mask=p_mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + n[:, None] * ssn + pair[None, :] * ssp, mask=p_mask, other=0.0).to(tl.float32)
    o_off = ((b * H + h) * N + n) * D                          # (B, H, N, D) storage
    _norm_rope_rows(Q, QD, QW, QO, QOD, b, n, h, mask, col, c, s, o_off, D, eps,
                    sqb, sqn, sqh, sqd, sqdb, sqdn, sqdh, sqdd, sqw, HAS_TANGENT, BLOCK_R, BLOCK_P)
    _norm_rope_rows(K, KD, KW, KO, KOD, b, n, h, mask, col, c, s, o_off, D, eps,
                    skb, skn, skh, skd, skdb, skdn, skdh, skdd, skw, HAS_TANGENT, BLOCK_R, BLOCK_P)


@triton.jit
def _norm_rope_bwd_rows(DY, X, W, DX, b, n, h, row, mask, col, c, s, D, eps,
                        sdyb, sdyn, sdyh, sdyd, sxb, sxn, sxh, sxd, sw,
                        BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """One tensor's backward rows: g = rope⁻¹(dy) (the gradient of n ⊙ w), dx = r·(g⊙w − n·mean(n ⊙ g⊙w))
    stored contiguous (B, N, H, D); returns Σ_rows g ⊙ n, this step's share of dw."""
    dy = tl.load(DY + (b * sdyb + n * sdyn + h * sdyh)[:, None] + col[None, :] * sdyd,
                 mask=mask, other=0.0).to(tl.float32)
    g = _rotate(dy, c, -s, BLOCK_R, BLOCK_P)
    x = tl.load(X + (b * sxb + n * sxn + h * sxh)[:, None] + col[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    nx = x * r[:, None]
    w = tl.load(W + col * sw, mask=col < D, other=0.0).to(tl.float32)[None, :]
    dn = g * w
    mu = tl.sum(nx * dn, axis=1) / D
    dx = (dn - nx * mu[:, None]) * r[:, None]
    tl.store(DX + row[:, None] * D + col[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    return tl.sum(g * nx, axis=0)


@triton.jit
def _qk_norm_rope_bwd_kernel(
    DQO, DKO,       # (B, N, H, D) gradients of q', k', any strides
    Q, K,           # (B, N, H, D) saved primal inputs, any strides
    QW, KW,         # (D,) weights
    COS, SIN,       # (N, D/2)
    DQ, DK,         # out: (B, N, H, D) contiguous
    DQW_PART, DKW_PART,  # out: (P, D) fp32 partial sums of the weight gradients, one row per program
    n_rows, N, H, D, eps,
    sdqb, sdqn, sdqh, sdqd,      # strides of DQO
    sdkb, sdkn, sdkh, sdkd,      # strides of DKO
    sqb, sqn, sqh, sqd,          # strides of Q
    skb, skn, skh, skd,          # strides of K
    sqw, skw, scn, scp, ssn, ssp,
    ROWS_PER_PROG: tl.constexpr,  # rows per program (a multiple of BLOCK_R)
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    col = tl.arange(0, 2 * BLOCK_P)
    pair = tl.arange(0, BLOCK_P)
    acc_q = tl.zeros((2 * BLOCK_P,), dtype=tl.float32)
    acc_k = tl.zeros((2 * BLOCK_P,), dtype=tl.float32)
    for r0 in range(0, ROWS_PER_PROG, BLOCK_R):
        row = p * ROWS_PER_PROG + r0 + tl.arange(0, BLOCK_R)
        r_mask = row < n_rows
        mask = r_mask[:, None] & (col < D)[None, :]
        p_mask = r_mask[:, None] & (pair < D // 2)[None, :]
        b, n, h = _row_index(row, N, H)
        c = tl.load(COS + n[:, None] * scn + pair[None, :] * scp, mask=p_mask, other=0.0).to(tl.float32)
        s = tl.load(SIN + n[:, None] * ssn + pair[None, :] * ssp, mask=p_mask, other=0.0).to(tl.float32)
        acc_q += _norm_rope_bwd_rows(DQO, Q, QW, DQ, b, n, h, row, mask, col, c, s, D, eps,
                                     sdqb, sdqn, sdqh, sdqd, sqb, sqn, sqh, sqd, sqw, BLOCK_R, BLOCK_P)
        acc_k += _norm_rope_bwd_rows(DKO, K, KW, DK, b, n, h, row, mask, col, c, s, D, eps,
                                     sdkb, sdkn, sdkh, sdkd, skb, skn, skh, skd, skw, BLOCK_R, BLOCK_P)
    tl.store(DQW_PART + p * D + col, acc_q, mask=col < D)
    tl.store(DKW_PART + p * D + col, acc_k, mask=col < D)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
_TABLE_DTYPES = "float32 or the inputs' dtype"


def check_qk_norm_rope(op: str, q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps) -> float:
    """Validate a call of ``op`` (``qk_norm_rope`` without the tangents, ``qk_norm_rope_jvp`` with both);
    returns eps as a float."""
    tangents = {"q_dot": q_dot, "k_dot": k_dot}
    has_tangent = check_tangents_together(op, tangents)
    dtype = check_tensors(op, {"q": q, "k": k, "q_weight": q_weight, "k_weight": k_weight, **tangents})
    table_dtype = check_tensors(op, {"cos": cos, "sin": sin})
    if table_dtype not in (torch.float32, dtype):
        raise ValueError(f"{op}: cos and sin have dtype {table_dtype}; allowed: {_TABLE_DTYPES} ({dtype})")
    if cos.device != q.device:
        raise ValueError(f"{op}: cos is on {cos.device} but q is on {q.device}; all inputs must be on one device")
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be 4-D (B, N, H, D) (batch, tokens, heads, head dim), got shape "
                         f"{tuple(q.shape)}")
    B, N, H, D = q.shape
    if D == 0 or D % 2:
        raise ValueError(f"{op}: head dim D = {D} (last dim of q) must be even and ≥ 2: RoPE rotates pairs "
                         f"of channels")
    check_shape(op, "k", k, q.shape, "q's shape (B, N, H, D)")
    if has_tangent:
        check_shape(op, "q_dot", q_dot, q.shape, "the tangent of q has q's shape")
        check_shape(op, "k_dot", k_dot, q.shape, "the tangent of k has k's shape")
    check_shape(op, "q_weight", q_weight, (D,), "(D,): one weight per head-dim channel")
    check_shape(op, "k_weight", k_weight, (D,), "(D,): one weight per head-dim channel")
    check_shape(op, "cos", cos, (N, D // 2), "(N, D/2) for q of shape (B, N, H, D): rope_cos_sin(N, D)")
    check_shape(op, "sin", sin, (N, D // 2), "(N, D/2) for q of shape (B, N, H, D): rope_cos_sin(N, D)")
    try:  # a Python or NumPy number or a 0-d tensor, as float() takes it
        value = float(eps)
    except (TypeError, ValueError, RuntimeError):
        value = float("nan")
    if isinstance(eps, bool) or not value >= 0:
        raise ValueError(f"{op}: eps must be a non-negative float, got {eps!r}")
    return value


def _strides4(t: torch.Tensor):
    return tuple(t.stride())


def _empty_bhnd(q: torch.Tensor) -> torch.Tensor:
    """A (B, N, H, D) tensor stored as (B, H, N, D): its ``transpose(1, 2)`` is the attention kernels'
    contiguous layout."""
    B, N, H, D = q.shape
    return q.new_empty((B, H, N, D)).transpose(1, 2)


def _launch_tiles(D: int) -> Tuple[int, int]:
    """(BLOCK_P, BLOCK_R): pairs per row (a power of 2) and whole rows per tile (~2048 values a tile, as
    the LayerNorm row kernels; not tuned for this op)."""
    block_p = next_pow2(D // 2)
    return block_p, tile_rows(2 * block_p)


def qk_norm_rope_fwd(q, k, q_weight, k_weight, cos, sin, q_dot=None, k_dot=None, eps: float = 1e-6,
                     check: bool = True):
    """Launch the forward kernel; returns (q', q̇', k', k̇'), each (B, N, H, D) in q's dtype stored as
    (B, H, N, D). Without the tangents (both None) the kernel runs primal only and q̇', k̇' are None.
    Inputs are read in place through their strides. ``check=False``: the caller has validated them."""
    has_tangent = q_dot is not None or k_dot is not None
    if check:
        eps = check_qk_norm_rope("qk_norm_rope_jvp" if has_tangent else "qk_norm_rope",
                                 q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps)
    B, N, H, D = q.shape
    qo, ko = _empty_bhnd(q), _empty_bhnd(q)
    if has_tangent:
        qod, kod = _empty_bhnd(q), _empty_bhnd(q)
    else:  # never read or written (HAS_TANGENT=False)
        q_dot, k_dot, qod, kod = q, k, qo, ko
    M = B * N * H
    if M > 0:
        block_p, block_r = _launch_tiles(D)
        _qk_norm_rope_fwd_kernel[(triton.cdiv(M, block_r),)](
            q, k, q_dot, k_dot, q_weight, k_weight, cos, sin, qo, ko, qod, kod,
            M, N, H, D, float(eps),
            *_strides4(q), *_strides4(k), *_strides4(q_dot), *_strides4(k_dot),
            q_weight.stride(0), k_weight.stride(0), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
            HAS_TANGENT=has_tangent, BLOCK_R=block_r, BLOCK_P=block_p,
            num_warps=row_num_warps(2 * block_p, block_r))
    return qo, (qod if has_tangent else None), ko, (kod if has_tangent else None)


def qk_norm_rope_bwd(dqo, dko, q, k, q_weight, k_weight, cos, sin, eps: float):
    """Launch the backward kernel; returns (dq, dk, dq_weight, dk_weight): dq, dk contiguous (B, N, H, D)
    in q's dtype, the weight gradients in the weights' dtype (fp32 partial sums per program, then one
    torch sum over the programs)."""
    B, N, H, D = q.shape
    M = B * N * H
    dq, dk = torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format)
    block_p, block_r = _launch_tiles(D)
    rows_per_prog = block_r * steps_per_program(triton.cdiv(M, block_r))
    P = triton.cdiv(M, rows_per_prog)
    dqw_part = torch.zeros(P, D, dtype=torch.float32, device=q.device)
    dkw_part = torch.zeros(P, D, dtype=torch.float32, device=q.device)
    if M > 0:
        _qk_norm_rope_bwd_kernel[(P,)](
            dqo, dko, q, k, q_weight, k_weight, cos, sin, dq, dk, dqw_part, dkw_part,
            M, N, H, D, float(eps),
            *_strides4(dqo), *_strides4(dko), *_strides4(q), *_strides4(k),
            q_weight.stride(0), k_weight.stride(0), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
            ROWS_PER_PROG=rows_per_prog, BLOCK_R=block_r, BLOCK_P=block_p,
            num_warps=row_num_warps(2 * block_p, block_r))
    return dq, dk, dqw_part.sum(0).to(q_weight.dtype), dkw_part.sum(0).to(k_weight.dtype)


# torch.library custom ops: one opaque node each for torch.compile; register_fake gives the shapes.
@kernel_op("meanflow_fast::qk_norm_rope_fwd")
def qk_norm_rope_fwd_op(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor, q_dot: torch.Tensor, k_dot: torch.Tensor, eps: float
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return qk_norm_rope_fwd(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps, check=False)


@qk_norm_rope_fwd_op.register_fake
def _qk_norm_rope_fwd_fake(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps):
    check_qk_norm_rope("qk_norm_rope_jvp", q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps)
    return _empty_bhnd(q), _empty_bhnd(q), _empty_bhnd(q), _empty_bhnd(q)


@kernel_op("meanflow_fast::qk_norm_rope_primal_fwd")
def qk_norm_rope_primal_fwd_op(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                               cos: torch.Tensor, sin: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    qo, _, ko, _ = qk_norm_rope_fwd(q, k, q_weight, k_weight, cos, sin, eps=eps, check=False)
    return qo, ko


@qk_norm_rope_primal_fwd_op.register_fake
def _qk_norm_rope_primal_fwd_fake(q, k, q_weight, k_weight, cos, sin, eps):
    check_qk_norm_rope("qk_norm_rope", q, k, q_weight, k_weight, cos, sin, None, None, eps)
    return _empty_bhnd(q), _empty_bhnd(q)


@kernel_op("meanflow_fast::qk_norm_rope_bwd")
def qk_norm_rope_bwd_op(dqo: torch.Tensor, dko: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return qk_norm_rope_bwd(dqo, dko, q, k, q_weight, k_weight, cos, sin, eps)


@qk_norm_rope_bwd_op.register_fake
def _qk_norm_rope_bwd_fake(dqo, dko, q, k, q_weight, k_weight, cos, sin, eps):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            q_weight.new_empty(q_weight.shape), k_weight.new_empty(k_weight.shape))


# ---------------------------------------------------------------------------------------------
# autograd.Function
# ---------------------------------------------------------------------------------------------
_TABLE_GRAD = ("{}: cos and sin are constant tables (rope_cos_sin); the kernels give them no gradient or "
               "tangent: detach them, or use qk_norm_rope_ref")


def _qk_norm_rope_backward(ctx, dqo, dko):
    """(dq, dk, dq_weight, dk_weight) through the primal stream: one Triton kernel. A gradient autograd
    left as None (that output took no part in the loss) runs as zeros."""
    if dqo is None and dko is None:
        return None, None, None, None
    q, k, q_weight, k_weight, cos, sin = ctx.saved_tensors
    dqo = dqo if dqo is not None else torch.zeros_like(q)
    dko = dko if dko is not None else torch.zeros_like(k)
    grads = qk_norm_rope_bwd_op(dqo, dko, q, k, q_weight, k_weight, cos, sin, ctx.eps)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4]))


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:6])  # q, k, q_weight, k_weight, cos, sin
    ctx.eps = float(inputs[-1])
    ctx.set_materialize_grads(False)


@jvp_function(jvp_inputs=6)
class QkNormRopeFunction(KernelFunction):
    """(q, k, q_weight, k_weight, cos, sin) → (q', k'), primal only, in the torch.func form. Saves the six
    inputs; the backward is the Triton backward. ``jvp`` runs the dual kernel, so torch.func.jvp over a
    model calling ``qk_norm_rope`` stays on the fused kernel; a weight tangent ẇ adds rope(n ⊙ ẇ), the
    primal kernel with ẇ for the weight (y is linear in w)."""

    @staticmethod
    def forward(q, k, q_weight, k_weight, cos, sin, eps):
        return qk_norm_rope_primal_fwd_op(q, k, q_weight, k_weight, cos, sin, float(eps))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup(ctx, inputs, output)

    @staticmethod
    @backward_once
    def backward(ctx, dqo, dko):
        return (*_qk_norm_rope_backward(ctx, dqo, dko), None, None, None)

    @staticmethod
    def jvp(ctx, q_t, k_t, qw_t, kw_t, cos_t, sin_t, _eps_t):
        if cos_t is not None or sin_t is not None:
            raise ValueError(_TABLE_GRAD.format("qk_norm_rope_jvp"))
        q, k, q_weight, k_weight, cos, sin = ctx.saved_tensors
        q_t, k_t = zeros_if_none(q_t, q), zeros_if_none(k_t, k)
        check_qk_norm_rope("qk_norm_rope_jvp", q, k, q_weight, k_weight, cos, sin, q_t, k_t, ctx.eps)
        _, q_dot, _, k_dot = qk_norm_rope_fwd_op(q, k, q_weight, k_weight, cos, sin, q_t, k_t, ctx.eps)
        if qw_t is not None or kw_t is not None:
            qw_t, kw_t = zeros_if_none(qw_t, q_weight), zeros_if_none(kw_t, k_weight)
            check_qk_norm_rope("qk_norm_rope_jvp", q, k, qw_t, kw_t, cos, sin, q_t, k_t, ctx.eps)
            q_w, k_w = qk_norm_rope_primal_fwd_op(q, k, qw_t, kw_t, cos, sin, ctx.eps)
            q_dot, k_dot = q_dot + q_w, k_dot + k_w
        return q_dot, k_dot


QkNormRopeFunctionWithoutJvp = QkNormRopeFunction.without_jvp


class QkNormRopeJvpFunction(KernelFunction):
    """(q, k, q_weight, k_weight, cos, sin, q̇, k̇) → (q', q̇', k', k̇') by the dual kernel. Saves the six
    primal inputs, nothing of the tangent stream; the backward is the Triton backward."""

    @staticmethod
    def forward(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps):
        return qk_norm_rope_fwd_op(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, float(eps))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1], output[3])

    @staticmethod
    @backward_once
    def backward(ctx, dqo, _dqo_dot, dko, _dko_dot):
        return (*_qk_norm_rope_backward(ctx, dqo, dko), None, None, None, None, None)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------
def _check_constant_tables(op: str, cos, sin) -> None:
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError(_TABLE_GRAD.format(op))


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q', k') = (rope(RMSNorm(q)), rope(RMSNorm(k))) per head in one Triton kernel, primal only;
    differentiable in q, k and the weights (Triton backward), forward-mode too. Same signature and
    contract as ``qk_norm_rope_ref``; the outputs are stored as (B, H, N, D) (module docstring)."""
    eps = check_qk_norm_rope("qk_norm_rope", q, k, q_weight, k_weight, cos, sin, None, None, eps)
    _check_constant_tables("qk_norm_rope", cos, sin)
    return pick_function(QkNormRopeFunction, QkNormRopeFunctionWithoutJvp).apply(
        q, k, q_weight, k_weight, cos, sin, eps)


def qk_norm_rope_jvp(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps: float = 1e-6
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q', q̇', k', k̇') in one Triton kernel; q' and k' are differentiable in q, k and the weights, the
    tangents carry no autograd graph (the weights are constants of the tangent). Same signature and
    contract as ``qk_norm_rope_jvp_ref``."""
    eps = check_qk_norm_rope("qk_norm_rope_jvp", q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps)
    _check_constant_tables("qk_norm_rope_jvp", cos, sin)
    return QkNormRopeJvpFunction.apply(q, k, q_weight, k_weight, cos, sin, q_dot, k_dot, eps)
