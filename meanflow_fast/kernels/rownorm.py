"""LayerNorm row helpers shared by the LayerNorm-modulate kernels (layernorm_modulate.py) and the gated
residual fused with it (gated_residual_ln.py): the Triton row math and the row tiles of their launches;
and ``prog_rows``, the step of the row loop of the backward passes (RMSNorm, GELU, SwiGLU).

Rows are (BLOCK_R, BLOCK_D) fp32 tiles holding whole rows (the statistics need them), columns past D
masked out (docs/DESIGN.md, JVP rules: LayerNorm-modulate).
"""
import triton
import triton.language as tl


@triton.jit
def ln_rows(x, mask, D, eps):
    """(μ, 1/σ, y = (x − μ)/σ) of each row of x; y is 0 outside ``mask``. Two-pass variance on the
    registers (no cancellation)."""
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
    return mean, rstd, xc * rstd[:, None]


@triton.jit
def ln_project(v, y, rstd, D):
    """(v − mean(v) − y·mean(y ⊙ v))/σ per row: the LayerNorm Jacobian applied to v. It is symmetric,
    so the same map gives the tangent (v = ẋ → ẏ) and the backward (v = dy → dx). v must be 0 outside
    the row (masked loads with other=0), as y is."""
    v_mean = tl.sum(v, axis=1) / D
    yv_mean = tl.sum(y * v, axis=1) / D
    return (v - v_mean[:, None] - y * yv_mean[:, None]) * rstd[:, None]


@triton.jit
def token_rows(b, p, r0, N_TOK, c_mask, ROWS_PER_PROG: tl.constexpr, BLOCK_R: tl.constexpr):
    """(row, row mask, tile mask) of one step of a row-reducing backward's token loop: program (b, p)
    walks tokens [p·ROWS_PER_PROG, (p+1)·ROWS_PER_PROG) of batch element b, BLOCK_R at a time from r0."""
    tok = p * ROWS_PER_PROG + r0 + tl.arange(0, BLOCK_R)
    r_mask = tok < N_TOK
    return b * N_TOK + tok, r_mask, r_mask[:, None] & c_mask[None, :]


@triton.jit
def ln_modulate_bwd_rows(DM, X, MEAN, RSTD, row, r_mask, mask, col, sc1, D, stride_dmm, stride_dmd, stride_xm,
                         stride_xd):
    """One step of the LayerNorm-modulate backward over the rows ``row``: (dm, y, dx) in fp32, with
    y = (x − μ)/σ from the saved statistics and dx = LN'(x)ᵀ(dm ⊙ (1 + scale)) (``sc1`` = 1 + scale);
    all 0 outside ``mask``."""
    x = tl.load(X + row[:, None] * stride_xm + col[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    dm = tl.load(DM + row[:, None] * stride_dmm + col[None, :] * stride_dmd, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + row, mask=r_mask, other=0.0)
    rstd = tl.load(RSTD + row, mask=r_mask, other=0.0)
    y = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    return dm, y, ln_project(dm * sc1[None, :], y, rstd, D)


# ~2048 fp32 values per tile and stream keep the ~8 live tiles of the dual forward at 8 values per thread
# and tile over 8 warps (no spills): 2 rows per program at D = 768 (the interpreter takes the same).
_ROW_TILE = 2048


def tile_rows(block_d: int) -> int:
    """Whole rows per tile of a LayerNorm row kernel, for rows ``block_d`` wide."""
    return max(1, _ROW_TILE // block_d)


def row_num_warps(block_d: int, block_r: int) -> int:
    """Warps of a LayerNorm row kernel over (block_r, block_d) tiles: 8 values per thread and tile."""
    return 8 if block_d * block_r >= 2048 else 4


@triton.jit
def prog_rows(p, r0, n_rows, c_mask, ROWS_PER_PROG: tl.constexpr, BLOCK_R: tl.constexpr):
    """(row, row mask, tile mask) of one step of a backward's row loop: program p walks rows
    [p·ROWS_PER_PROG, (p+1)·ROWS_PER_PROG), BLOCK_R at a time from r0."""
    row = p * ROWS_PER_PROG + r0 + tl.arange(0, BLOCK_R).to(tl.int64)
    r_mask = row < n_rows
    return row, r_mask, r_mask[:, None] & c_mask[None, :]
