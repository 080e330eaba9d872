"""Attention forward with its tangent, and the primal backward.

Layout (B, H, N, D): batch, heads, tokens, head dim. A (B, N, H, D) tensor (heads and tokens swapped,
e.g. a (B, N, 3, H, D) projection unbound without its transpose) has the right rank and, when its last
dim is a supported head dim, passes every check: the kernels then attend over the heads instead of the
tokens, silently. Use ``split_qkv`` or ``.transpose(1, 2)``. With S = s·QKᵀ, P = softmax(S), O = PV
(docs/DESIGN.md, JVP rules: attention):

    Ṡ = s·(Q̇Kᵀ + QK̇ᵀ),   Ṗ = P ⊙ (Ṡ − rowsum(P ⊙ Ṡ)),   Ȯ = ṖV + PV̇

The file runs in one order: the pure-torch references, the Triton kernels, their launchers (registered
as ``torch.library`` custom ops ``meanflow_fast::attn_fwd``, ``::attn_fwd_jvp``, ``::attn_bwd``,
``::attn_bwd_qkv`` so that torch.compile can call them; internal: they trust the checks of the public
functions), the autograd Functions, and the public functions:

    o = attention(q, k, v, scale=None)                         # differentiable, forward-mode too
    o, o_dot = attention_jvp(q, k, v, q_dot, k_dot, v_dot)     # fused dual stream; o_dot has no graph
    o, o_dot = attention_jvp_qkv(qkv, qkv_dot, num_heads)      # the same on the packed (B, N, 3·H·D)
                                                               # projection (the DiT's), packed gradient

Kernel conventions, shared by every kernel of the file:

- tensors are (B, H, N, D) with unit stride on D (the launchers ensure it) and any other strides,
  so the q, k, v views that the DiT cuts out of its (B, N, 3, H, D) qkv projection need no copy;
- the grid is (row blocks, B·H); the (b, h) base offsets are int64 (B·H·N·D can pass 2³¹), offsets
  within one (b, h) stay int32;
- scores live in the log2 domain (S·log2 e) so the softmax uses exp2; LSE is stored in natural log,
  LSE = m + log l, fp32, contiguous (B, H, N);
- Triton tiles are powers of 2 wide, so the head dim is cut into two column chunks: a low chunk
  [0, BLOCK_DLO), the largest power of 2 ≤ D (no column mask), and, when D is not a power of 2, a high
  chunk [BLOCK_DLO, BLOCK_DLO + BLOCK_DHI) masked at D: D = 72 runs 64 + 16 columns, D = 96 64 + 32.
  Every dot over D is then two dots, and every (rows, D) accumulator two; one 128-wide tile for D = 72
  computed 78% more and spilled in every config (docs/TUNING.md);
- every (B, H, N) stride and (b, h) offset goes through ``_aligned`` with the launcher's ALIGN, the
  largest power of 2 ≤ 8 dividing all of them: Triton only specialises integers on divisibility by 16,
  and at D = 72 (packed qkv head stride 72) the loads were scalar and unpipelined without it;
- all accumulators, softmax statistics and reductions are fp32; P is rounded to the input dtype only
  as a tl.dot operand (as FlashAttention does), and fp32 inputs use IEEE dots, not TF32.
"""
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .reference import compute_dtype
from .launch import (KernelFunction, backward_once, check_no_bf16_dot_on_cpu, interpreting, jvp_function, kernel_op,
                     pick_function, zeros_if_none)


# ---------------------------------------------------------------------------------------------
# Reference (pure torch)
# ---------------------------------------------------------------------------------------------
def _default_scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def attention_ref(q, k, v, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(scale·QKᵀ)·V for q, k, v (B, H, N, D) (batch, heads, tokens, head dim; any dtype, any D) in
    plain torch ops (fp16/bf16 computed in fp32), scale defaulting to 1/sqrt(D); torch.func.jvp works on
    it. Returns O (B, H, N, D)."""
    _check_bhnd([("q", q), ("k", k), ("v", v)])
    s = _default_scale(q, scale)
    dt = compute_dtype(q.dtype)
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    p = torch.softmax((qf @ kf.transpose(-1, -2)) * s, dim=-1)  # (B, H, N, N)
    return (p @ vf).to(q.dtype)


def attention_jvp_ref(q, k, v, q_dot, k_dot, v_dot,
                      scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(O, Ȯ) of ``attention_ref`` by the explicit rule, q, k, v and their tangents all (B, H, N, D) (batch,
    heads, tokens, head dim), as O and Ȯ. O is differentiable; Ȯ carries no autograd graph."""
    _check_bhnd([("q", q), ("k", k), ("v", v), ("q_dot", q_dot), ("k_dot", k_dot), ("v_dot", v_dot)])
    s = _default_scale(q, scale)
    dt = compute_dtype(q.dtype)
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    p = torch.softmax((qf @ kf.transpose(-1, -2)) * s, dim=-1)  # (B, H, N, N)
    o = p @ vf
    with torch.no_grad():
        qd, kd, vd = q_dot.to(dt), k_dot.to(dt), v_dot.to(dt)
        s_dot = (qd @ kf.transpose(-1, -2) + qf @ kd.transpose(-1, -2)) * s
        ps = p * s_dot
        p_dot = ps - p * ps.sum(-1, keepdim=True)
        o_dot = p_dot @ vf + p @ vd
    return o.to(q.dtype), o_dot.to(q.dtype)


def split_qkv(qkv: torch.Tensor, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DiT's packed projection (B, N, 3·H·D), laid out (3, H, D) along the last dim, as three
    (B, H, N, D) views (no copy)."""
    _check_qkv("qkv", qkv, num_heads)
    return _qkv_views(qkv, num_heads)


def _qkv_views(qkv: torch.Tensor, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``split_qkv`` of a checked qkv."""
    B, N, C3 = qkv.shape
    return qkv.view(B, N, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)


def attention_jvp_qkv_ref(qkv, qkv_dot, num_heads: int,
                          scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``attention_jvp_ref`` on the packed projection and its tangent: (O, Ȯ) of shape (B, H, N, D)."""
    return attention_jvp_ref(*split_qkv(qkv, num_heads), *split_qkv(qkv_dot, num_heads), scale=scale)


def _check_qkv(name: str, qkv, num_heads) -> None:
    if not isinstance(qkv, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(qkv).__name__}")
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"{name} must be (B, N, 3·num_heads·D) with num_heads = {num_heads}, got shape "
                         f"{tuple(qkv.shape)}")


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
_INTERPRET = interpreting()


def _tile_configs(tiles):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


def _configs(gpu_configs, interp_block_m: int, interp_block_n: int):
    """Autotune candidates on a GPU; one fixed config in the interpreter (one config skips benchmarking,
    which needs a GPU). The interpreter blocks differ (32 × 16) so the tests cover BLOCK_M ≠ BLOCK_N and
    several key blocks with a masked tail at N = 33 and 100."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": interp_block_m, "BLOCK_N": interp_block_n}, num_warps=4, num_stages=1)]
    return _tile_configs(gpu_configs)


# cache_results=True: the autotuners' timings are kept in Triton's cache directory (keyed on the GPU, the
# kernel source, the tuning key and the candidate list), so a resumed run or a later sampling process
# skips the benchmarking and only loads the compiled winner.
def _fp32_prune(fp32_tiles):
    """``early_config_prune`` for an autotuner below: fp32 inputs get ``fp32_tiles`` in place of the list,
    fp16/bf16 the list unchanged. (The autotuner only prunes when it has more than one config, so the
    interpreter's single config never gets here; it is left alone anyway.)"""
    fp32_configs = _tile_configs(fp32_tiles)

    def prune(configs, named_args, **kwargs):
        if _INTERPRET or named_args["Q"].dtype != torch.float32:
            return configs
        return fp32_configs
    return prune


# (BLOCK_M, BLOCK_N, num_warps, num_stages): FlashAttention-2-sized tiles, smaller key blocks for the
# tangent variant (two fp32 (BLOCK_M, D) accumulators and Q, Q̇ live). No (64, 32, 8 warps, 3 stages): it
# faulted on an H100 at D = 72 with tangent, and one faulting candidate kills the process (docs/TUNING.md).
_FWD_CONFIGS = [(64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 16, 4, 3)]
_BWD_DKDV_CONFIGS = [(32, 64, 4, 2), (64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2)]
_BWD_DQ_CONFIGS = [(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2)]
# fp32 inputs: one small tile each. IEEE fp32 dots run on the FMA units with operands in registers: the
# lists above all spill in fp32, some overflow shared memory, and compile for minutes; these compile in
# 1-3 s (benchmarks/tools/compile_check.py; fp32 is the accuracy path, not the fast one; docs/TUNING.md).
_FWD_CONFIGS_FP32 = [(32, 16, 8, 2)]
_BWD_DKDV_CONFIGS_FP32 = [(16, 32, 4, 1)]
_BWD_DQ_CONFIGS_FP32 = [(32, 16, 4, 1)]


@triton.jit
def _load_rows(base, offs_r, stride_r, mask_r, offs_d, HEAD_DIM: tl.constexpr, MASK_D: tl.constexpr):
    """The (rows, columns) tile base[r, d] for r in offs_r (rows beyond mask_r read 0) and d in offs_d
    (with MASK_D, columns ≥ HEAD_DIM read 0; the low chunk needs no column mask)."""
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :]
    if MASK_D:
        mask = mask_r[:, None] & (offs_d < HEAD_DIM)[None, :]
    else:
        mask = mask_r[:, None]  # broadcast over the columns by tl.load
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_rows(base, offs_r, stride_r, mask_r, offs_d, value, HEAD_DIM: tl.constexpr, MASK_D: tl.constexpr):
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :]
    if MASK_D:
        mask = mask_r[:, None] & (offs_d < HEAD_DIM)[None, :]
    else:
        mask = mask_r[:, None]
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _aligned(x, ALIGN: tl.constexpr):
    """x, a stride or an offset in elements, as (x // ALIGN)·ALIGN: the same value (the launcher's ALIGN
    divides every stride) written so that Triton knows it is a multiple of ALIGN: 16-byte row starts at
    ALIGN = 8 in 16-bit dtypes, hence vectorised, cp.async-pipelined tile loads."""
    return x // ALIGN * ALIGN


@triton.jit
def _attn_fwd_jvp_block(
    acc_o0, acc_o1,                # (BLOCK_M, chunk) fp32: Σ P̃V, low and high head-dim chunk
    acc_d0, acc_d1,                # (BLOCK_M, chunk) fp32: Σ P̃(Ṡ − c)V + P̃V̇, low and high chunk
    m_i, l_i, r_i, c_i,            # (BLOCK_M,) fp32: running max (log2), Σ P̃, Σ P̃(Ṡ − c), shift c
    q0, q1, qd0, qd1,              # query tile and its tangent, low and high chunk
    k_base, v_base,                # K, V of this (b, h)
    kd_base, vd_base,              # K̇, V̇ of this (b, h)
    stride_kn, stride_vn,          # row strides
    stride_kdn, stride_vdn,
    start_n,                       # first key of this block
    N,                             # sequence length
    sm_scale, qk_scale,            # s and s·log2 e
    offs_lo, offs_hi,              # head-dim offsets of the two chunks
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FIRST: tl.constexpr,           # first key block: fixes the per-row tangent shift c
    HAS_TANGENT: tl.constexpr,
    SPLIT: tl.constexpr,           # the high chunk exists (else its arguments are unused stand-ins)
    DOT_PRECISION: tl.constexpr,
):
    """One key block of the online softmax, primal and tangent (docs/DESIGN.md, JVP rules: attention), all
    state rescaled by α."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k0 = _load_rows(k_base, offs_n, stride_kn, mask_n, offs_lo, HEAD_DIM, False)
    v0 = _load_rows(v_base, offs_n, stride_vn, mask_n, offs_lo, HEAD_DIM, False)
    s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
    if SPLIT:
        k1 = _load_rows(k_base, offs_n, stride_kn, mask_n, offs_hi, HEAD_DIM, True)
        v1 = _load_rows(v_base, offs_n, stride_vn, mask_n, offs_hi, HEAD_DIM, True)
        s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PRECISION)
    s = s * qk_scale                                                       # (BLOCK_M, BLOCK_N), log2 domain
    s = tl.where(mask_n[None, :], s, float("-inf"))                        # keys beyond N
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])                                        # P̃ (0 on masked keys)
    p_sum = tl.sum(p, 1)
    l_i = l_i * alpha + p_sum
    acc_o0 = tl.dot(p.to(v0.dtype), v0, acc_o0 * alpha[:, None], input_precision=DOT_PRECISION)
    if SPLIT:
        acc_o1 = tl.dot(p.to(v1.dtype), v1, acc_o1 * alpha[:, None], input_precision=DOT_PRECISION)

    if HAS_TANGENT:
        kd0 = _load_rows(kd_base, offs_n, stride_kdn, mask_n, offs_lo, HEAD_DIM, False)
        vd0 = _load_rows(vd_base, offs_n, stride_vdn, mask_n, offs_lo, HEAD_DIM, False)
        s_dot = tl.dot(qd0, tl.trans(k0), input_precision=DOT_PRECISION)
        s_dot = tl.dot(q0, tl.trans(kd0), s_dot, input_precision=DOT_PRECISION)
        if SPLIT:
            kd1 = _load_rows(kd_base, offs_n, stride_kdn, mask_n, offs_hi, HEAD_DIM, True)
            vd1 = _load_rows(vd_base, offs_n, stride_vdn, mask_n, offs_hi, HEAD_DIM, True)
            s_dot = tl.dot(qd1, tl.trans(k1), s_dot, input_precision=DOT_PRECISION)
            s_dot = tl.dot(q1, tl.trans(kd1), s_dot, input_precision=DOT_PRECISION)
        s_dot = s_dot * sm_scale                                           # Ṡ = s·(Q̇Kᵀ + QK̇ᵀ)
        if FIRST:
            # Ṗ is unchanged by a per-row constant c taken off Ṡ; c = the P-weighted mean of Ṡ over the
            # first key block keeps P̃ ⊙ (Ṡ − c) small before its low-precision dot and stops the final
            # Ȯ = acc_d/l − (r/l)·O from cancelling (keys with a shared offset give Ṡ a row constant).
            c_i = tl.sum(p * s_dot, 1) / p_sum
        ps = p * (s_dot - c_i[:, None])
        r_i = r_i * alpha + tl.sum(ps, 1)
        acc_d0 = tl.dot(ps.to(v0.dtype), v0, acc_d0 * alpha[:, None], input_precision=DOT_PRECISION)
        acc_d0 = tl.dot(p.to(vd0.dtype), vd0, acc_d0, input_precision=DOT_PRECISION)
        if SPLIT:
            acc_d1 = tl.dot(ps.to(v1.dtype), v1, acc_d1 * alpha[:, None], input_precision=DOT_PRECISION)
            acc_d1 = tl.dot(p.to(vd1.dtype), vd1, acc_d1, input_precision=DOT_PRECISION)
    return acc_o0, acc_o1, acc_d0, acc_d1, m_new, l_i, r_i, c_i


@triton.autotune(configs=_configs(_FWD_CONFIGS, 32, 16), key=["N", "HEAD_DIM", "HAS_TANGENT", "ALIGN"],
                 prune_configs_by={"early_config_prune": _fp32_prune(_FWD_CONFIGS_FP32)},
                 cache_results=True)
@triton.jit
def _attn_fwd_jvp_kernel(
    Q, K, V,                       # (B, H, N, D) primals
    QD, KD, VD,                    # (B, H, N, D) tangents (not read when HAS_TANGENT is False)
    O, OD,                         # (B, H, N, D) out: O and Ȯ (OD not written when HAS_TANGENT is False)
    LSE,                           # (B, H, N) fp32 out, contiguous: m + log l
    stride_qb, stride_qh, stride_qn,      # strides of Q over (B, H, N); D has stride 1
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_qdb, stride_qdh, stride_qdn,
    stride_kdb, stride_kdh, stride_kdn,
    stride_vdb, stride_vdh, stride_vdn,
    stride_ob, stride_oh, stride_on,
    stride_odb, stride_odh, stride_odn,
    H,                             # heads
    N,                             # sequence length (queries = keys)
    sm_scale,                      # softmax scale s
    HEAD_DIM: tl.constexpr,        # D
    BLOCK_DLO: tl.constexpr,       # low head-dim chunk [0, BLOCK_DLO): the largest power of 2 ≤ D
    BLOCK_DHI: tl.constexpr,       # high chunk [BLOCK_DLO, BLOCK_DLO + BLOCK_DHI), masked at D
    SPLIT: tl.constexpr,           # D > BLOCK_DLO (else the high chunk is not used)
    HAS_TANGENT: tl.constexpr,     # False: primal forward only (O, LSE)
    DOT_PRECISION: tl.constexpr,   # "ieee" for fp32 inputs, "tf32" (unused) for fp16/bf16
    ALIGN: tl.constexpr,           # divides every (B, H, N) stride (see ``_aligned``)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """O, LSE and Ȯ for BLOCK_M queries of one (b, h), in one pass over the key blocks: each K, V, K̇, V̇
    tile is loaded once. The state is (m, l, acc_o) of the online softmax plus, for the tangent,
    r = Σ P̃ ⊙ (Ṡ − c) and acc_d = Σ (P̃ ⊙ (Ṡ − c))V + P̃V̇ (the acc_g + acc_t of docs/DESIGN.md, JVP
    rules: attention; only their sum is used, so one accumulator). At the end O = acc_o/l,
    Ȯ = acc_d/l − (r/l)·O.
    Every (BLOCK_M, D) quantity is held as two column chunks (see the head-dim note above)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    offs_lo = tl.arange(0, BLOCK_DLO)
    offs_hi = BLOCK_DLO + tl.arange(0, BLOCK_DHI)

    stride_qn, stride_kn, stride_vn = _aligned(stride_qn, ALIGN), _aligned(stride_kn, ALIGN), _aligned(stride_vn, ALIGN)
    stride_qdn, stride_kdn, stride_vdn = (_aligned(stride_qdn, ALIGN), _aligned(stride_kdn, ALIGN),
                                          _aligned(stride_vdn, ALIGN))
    stride_on, stride_odn = _aligned(stride_on, ALIGN), _aligned(stride_odn, ALIGN)
    q_base = Q + _aligned(off_b * stride_qb + off_h * stride_qh, ALIGN)
    qd_base = QD + _aligned(off_b * stride_qdb + off_h * stride_qdh, ALIGN)
    q0 = _load_rows(q_base, offs_m, stride_qn, mask_m, offs_lo, HEAD_DIM, False)
    q1 = q0
    qd0 = q0
    qd1 = q0
    if SPLIT:
        q1 = _load_rows(q_base, offs_m, stride_qn, mask_m, offs_hi, HEAD_DIM, True)
    if HAS_TANGENT:
        qd0 = _load_rows(qd_base, offs_m, stride_qdn, mask_m, offs_lo, HEAD_DIM, False)
        if SPLIT:
            qd1 = _load_rows(qd_base, offs_m, stride_qdn, mask_m, offs_hi, HEAD_DIM, True)
    k_base = K + _aligned(off_b * stride_kb + off_h * stride_kh, ALIGN)
    v_base = V + _aligned(off_b * stride_vb + off_h * stride_vh, ALIGN)
    kd_base = KD + _aligned(off_b * stride_kdb + off_h * stride_kdh, ALIGN)
    vd_base = VD + _aligned(off_b * stride_vdb + off_h * stride_vdh, ALIGN)
    qk_scale = sm_scale * 1.4426950408889634  # log2 e

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    c_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_o0 = tl.zeros([BLOCK_M, BLOCK_DLO], dtype=tl.float32)
    acc_d0 = tl.zeros([BLOCK_M, BLOCK_DLO], dtype=tl.float32)
    acc_o1 = tl.zeros([BLOCK_M, BLOCK_DHI], dtype=tl.float32)
    acc_d1 = tl.zeros([BLOCK_M, BLOCK_DHI], dtype=tl.float32)

    # First key block peeled off: it also fixes the tangent shift c (every row has a valid key in it).
    acc_o0, acc_o1, acc_d0, acc_d1, m_i, l_i, r_i, c_i = _attn_fwd_jvp_block(
        acc_o0, acc_o1, acc_d0, acc_d1, m_i, l_i, r_i, c_i, q0, q1, qd0, qd1,
        k_base, v_base, kd_base, vd_base, stride_kn, stride_vn, stride_kdn, stride_vdn,
        0, N, sm_scale, qk_scale, offs_lo, offs_hi,
        HEAD_DIM, BLOCK_N, True, HAS_TANGENT, SPLIT, DOT_PRECISION)
    for start_n in range(BLOCK_N, N, BLOCK_N):
        acc_o0, acc_o1, acc_d0, acc_d1, m_i, l_i, r_i, c_i = _attn_fwd_jvp_block(
            acc_o0, acc_o1, acc_d0, acc_d1, m_i, l_i, r_i, c_i, q0, q1, qd0, qd1,
            k_base, v_base, kd_base, vd_base, stride_kn, stride_vn, stride_kdn, stride_vdn,
            start_n, N, sm_scale, qk_scale, offs_lo, offs_hi,
            HEAD_DIM, BLOCK_N, False, HAS_TANGENT, SPLIT, DOT_PRECISION)

    inv_l = 1.0 / l_i
    o_base = O + _aligned(off_b * stride_ob + off_h * stride_oh, ALIGN)
    od_base = OD + _aligned(off_b * stride_odb + off_h * stride_odh, ALIGN)
    o0 = acc_o0 * inv_l[:, None]
    _store_rows(o_base, offs_m, stride_on, mask_m, offs_lo, o0, HEAD_DIM, False)
    if SPLIT:
        o1 = acc_o1 * inv_l[:, None]
        _store_rows(o_base, offs_m, stride_on, mask_m, offs_hi, o1, HEAD_DIM, True)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # ln 2: back to natural log
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, lse, mask=mask_m)
    if HAS_TANGENT:
        r_l = (r_i * inv_l)[:, None]
        _store_rows(od_base, offs_m, stride_odn, mask_m, offs_lo, acc_d0 * inv_l[:, None] - r_l * o0,
                    HEAD_DIM, False)                                      # O in fp32, before rounding
        if SPLIT:
            _store_rows(od_base, offs_m, stride_odn, mask_m, offs_hi, acc_d1 * inv_l[:, None] - r_l * o1,
                        HEAD_DIM, True)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO,                         # (B, H, N, D) output and its gradient
    DELTA,                         # (B, H, N) fp32 out, contiguous: Δ = rowsum(dO ⊙ O)
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    H, N,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,         # next power of 2 ≥ D (elementwise: the padding costs only masked lanes)
    ALIGN: tl.constexpr,           # divides every (B, H, N) stride (see ``_aligned``)
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    row_mask = mask_m[:, None] & (offs_d < HEAD_DIM)[None, :]
    o_base = O + _aligned(off_b * stride_ob + off_h * stride_oh, ALIGN)
    do_base = DO + _aligned(off_b * stride_dob + off_h * stride_doh, ALIGN)
    o = tl.load(o_base + offs_m[:, None] * _aligned(stride_on, ALIGN) + offs_d[None, :],
                mask=row_mask, other=0.0).to(tl.float32)
    do = tl.load(do_base + offs_m[:, None] * _aligned(stride_don, ALIGN) + offs_d[None, :],
                 mask=row_mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, tl.sum(o * do, 1), mask=mask_m)


@triton.autotune(configs=_configs(_BWD_DKDV_CONFIGS, 16, 32), key=["N", "HEAD_DIM", "ALIGN"],
                 prune_configs_by={"early_config_prune": _fp32_prune(_BWD_DKDV_CONFIGS_FP32)},
                 cache_results=True)
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO,                   # (B, H, N, D) inputs and dO
    LSE, DELTA,                    # (B, H, N) fp32, contiguous
    DK, DV,                        # (B, H, N, D) out
    stride_qb, stride_qh, stride_qn,      # strides over (B, H, N); D has stride 1
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, N,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_DLO: tl.constexpr,       # head-dim chunks, as in the forward
    BLOCK_DHI: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ALIGN: tl.constexpr,           # divides every (B, H, N) stride (see ``_aligned``)
    BLOCK_M: tl.constexpr,         # queries per inner step
    BLOCK_N: tl.constexpr,         # keys owned by this program
):
    """dK, dV for BLOCK_N keys of one (b, h), looping over all query blocks (FlashAttention-2, Alg. 2):
    Pᵀ = exp(s·KQᵀ − LSE),  dV = Σ Pᵀ dO,  dSᵀ = Pᵀ ⊙ (V dOᵀ − Δ),  dK = s·Σ dSᵀ Q."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_lo = tl.arange(0, BLOCK_DLO)
    offs_hi = BLOCK_DLO + tl.arange(0, BLOCK_DHI)

    stride_qn, stride_kn, stride_vn = _aligned(stride_qn, ALIGN), _aligned(stride_kn, ALIGN), _aligned(stride_vn, ALIGN)
    stride_don, stride_dkn, stride_dvn = (_aligned(stride_don, ALIGN), _aligned(stride_dkn, ALIGN),
                                          _aligned(stride_dvn, ALIGN))
    k_base = K + _aligned(off_b * stride_kb + off_h * stride_kh, ALIGN)
    v_base = V + _aligned(off_b * stride_vb + off_h * stride_vh, ALIGN)
    k0 = _load_rows(k_base, offs_n, stride_kn, mask_n, offs_lo, HEAD_DIM, False)
    v0 = _load_rows(v_base, offs_n, stride_vn, mask_n, offs_lo, HEAD_DIM, False)
    if SPLIT:
        k1 = _load_rows(k_base, offs_n, stride_kn, mask_n, offs_hi, HEAD_DIM, True)
        v1 = _load_rows(v_base, offs_n, stride_vn, mask_n, offs_hi, HEAD_DIM, True)
    q_base = Q + _aligned(off_b * stride_qb + off_h * stride_qh, ALIGN)
    do_base = DO + _aligned(off_b * stride_dob + off_h * stride_doh, ALIGN)
    stat_base = pid_bh.to(tl.int64) * N
    qk_scale = sm_scale * 1.4426950408889634  # log2 e

    dk0 = tl.zeros([BLOCK_N, BLOCK_DLO], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, BLOCK_DLO], dtype=tl.float32)
    dk1 = tl.zeros([BLOCK_N, BLOCK_DHI], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, BLOCK_DHI], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        q0 = _load_rows(q_base, offs_m, stride_qn, mask_m, offs_lo, HEAD_DIM, False)
        do0 = _load_rows(do_base, offs_m, stride_don, mask_m, offs_lo, HEAD_DIM, False)
        lse = tl.load(LSE + stat_base + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + stat_base + offs_m, mask=mask_m, other=0.0)

        s_t = tl.dot(k0, tl.trans(q0), input_precision=DOT_PRECISION)            # (BLOCK_N, BLOCK_M)
        if SPLIT:
            q1 = _load_rows(q_base, offs_m, stride_qn, mask_m, offs_hi, HEAD_DIM, True)
            do1 = _load_rows(do_base, offs_m, stride_don, mask_m, offs_hi, HEAD_DIM, True)
            s_t = tl.dot(k1, tl.trans(q1), s_t, input_precision=DOT_PRECISION)
        p_t = tl.exp2(s_t * qk_scale - lse[None, :])
        p_t = tl.where(mask_m[None, :], p_t, 0.0)                                 # queries beyond N
        dv0 = tl.dot(p_t.to(do0.dtype), do0, dv0, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v0, tl.trans(do0), input_precision=DOT_PRECISION)
        if SPLIT:
            dv1 = tl.dot(p_t.to(do1.dtype), do1, dv1, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v1, tl.trans(do1), dp_t, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk0 = tl.dot(ds_t.to(q0.dtype), q0, dk0, input_precision=DOT_PRECISION)
        if SPLIT:
            dk1 = tl.dot(ds_t.to(q1.dtype), q1, dk1, input_precision=DOT_PRECISION)

    dk_base = DK + _aligned(off_b * stride_dkb + off_h * stride_dkh, ALIGN)
    dv_base = DV + _aligned(off_b * stride_dvb + off_h * stride_dvh, ALIGN)
    _store_rows(dk_base, offs_n, stride_dkn, mask_n, offs_lo, dk0 * sm_scale, HEAD_DIM, False)
    _store_rows(dv_base, offs_n, stride_dvn, mask_n, offs_lo, dv0, HEAD_DIM, False)
    if SPLIT:
        _store_rows(dk_base, offs_n, stride_dkn, mask_n, offs_hi, dk1 * sm_scale, HEAD_DIM, True)
        _store_rows(dv_base, offs_n, stride_dvn, mask_n, offs_hi, dv1, HEAD_DIM, True)


@triton.autotune(configs=_configs(_BWD_DQ_CONFIGS, 32, 16), key=["N", "HEAD_DIM", "ALIGN"],
                 prune_configs_by={"early_config_prune": _fp32_prune(_BWD_DQ_CONFIGS_FP32)},
                 cache_results=True)
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO,                   # (B, H, N, D) inputs and dO
    LSE, DELTA,                    # (B, H, N) fp32, contiguous
    DQ,                            # (B, H, N, D) out
    stride_qb, stride_qh, stride_qn,      # strides over (B, H, N); D has stride 1
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    H, N,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_DLO: tl.constexpr,       # head-dim chunks, as in the forward
    BLOCK_DHI: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ALIGN: tl.constexpr,           # divides every (B, H, N) stride (see ``_aligned``)
    BLOCK_M: tl.constexpr,         # queries owned by this program
    BLOCK_N: tl.constexpr,         # keys per inner step
):
    """dQ for BLOCK_M queries of one (b, h), looping over all key blocks:
    P = exp(s·QKᵀ − LSE),  dS = P ⊙ (dO Vᵀ − Δ),  dQ = s·Σ dS K."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    offs_lo = tl.arange(0, BLOCK_DLO)
    offs_hi = BLOCK_DLO + tl.arange(0, BLOCK_DHI)

    stride_qn, stride_kn, stride_vn = _aligned(stride_qn, ALIGN), _aligned(stride_kn, ALIGN), _aligned(stride_vn, ALIGN)
    stride_don, stride_dqn = _aligned(stride_don, ALIGN), _aligned(stride_dqn, ALIGN)
    q_base = Q + _aligned(off_b * stride_qb + off_h * stride_qh, ALIGN)
    do_base = DO + _aligned(off_b * stride_dob + off_h * stride_doh, ALIGN)
    q0 = _load_rows(q_base, offs_m, stride_qn, mask_m, offs_lo, HEAD_DIM, False)
    do0 = _load_rows(do_base, offs_m, stride_don, mask_m, offs_lo, HEAD_DIM, False)
    if SPLIT:
        q1 = _load_rows(q_base, offs_m, stride_qn, mask_m, offs_hi, HEAD_DIM, True)
        do1 = _load_rows(do_base, offs_m, stride_don, mask_m, offs_hi, HEAD_DIM, True)
    stat_base = pid_bh.to(tl.int64) * N
    lse = tl.load(LSE + stat_base + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + stat_base + offs_m, mask=mask_m, other=0.0)
    k_base = K + _aligned(off_b * stride_kb + off_h * stride_kh, ALIGN)
    v_base = V + _aligned(off_b * stride_vb + off_h * stride_vh, ALIGN)
    qk_scale = sm_scale * 1.4426950408889634  # log2 e

    dq0 = tl.zeros([BLOCK_M, BLOCK_DLO], dtype=tl.float32)
    dq1 = tl.zeros([BLOCK_M, BLOCK_DHI], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k0 = _load_rows(k_base, offs_n, stride_kn, mask_n, offs_lo, HEAD_DIM, False)
        v0 = _load_rows(v_base, offs_n, stride_vn, mask_n, offs_lo, HEAD_DIM, False)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)               # (BLOCK_M, BLOCK_N)
        if SPLIT:
            k1 = _load_rows(k_base, offs_n, stride_kn, mask_n, offs_hi, HEAD_DIM, True)
            v1 = _load_rows(v_base, offs_n, stride_vn, mask_n, offs_hi, HEAD_DIM, True)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PRECISION)
        p = tl.exp2(s * qk_scale - lse[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)                                     # keys beyond N
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PRECISION)
        if SPLIT:
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq0 = tl.dot(ds.to(k0.dtype), k0, dq0, input_precision=DOT_PRECISION)
        if SPLIT:
            dq1 = tl.dot(ds.to(k1.dtype), k1, dq1, input_precision=DOT_PRECISION)
    dq_base = DQ + _aligned(off_b * stride_dqb + off_h * stride_dqh, ALIGN)
    _store_rows(dq_base, offs_m, stride_dqn, mask_m, offs_lo, dq0 * sm_scale, HEAD_DIM, False)
    if SPLIT:
        _store_rows(dq_base, offs_m, stride_dqn, mask_m, offs_hi, dq1 * sm_scale, HEAD_DIM, True)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (32, 64, 72, 96, 128)
_MAX_GRID_Y = 65535  # B·H rides grid axis 1: row blocks of one (b, h) run next to each other and share K, V in L2


def _check_scale(scale) -> float:
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a real number (or None for 1/sqrt(D)), got {scale!r}") from None
    if not math.isfinite(s) or s == 0.0:
        raise ValueError(f"scale must be finite and non-zero, got {s}")
    return s


def _resolve_scale(q: torch.Tensor, scale) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else _check_scale(scale)


_LAYOUT = "(B, H, N, D) (batch, heads, tokens, head dim)"


def _check_bhnd(tensors, dtypes=None) -> None:
    """Validate (name, tensor) pairs: each a 4-D (B, H, N, D) tensor (of one of ``dtypes`` when given), all
    alike in shape, dtype and device. What the layout cannot tell: a (B, N, H, D) tensor passes."""
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D {_LAYOUT}, got {t.dim()}-D with shape {tuple(t.shape)}")
        if dtypes is not None and t.dtype not in dtypes:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: "
                             f"{', '.join(str(d).replace('torch.', '') for d in dtypes)}")
    ref_name, ref = tensors[0]
    for name, t in tensors[1:]:
        if t.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}: "
                             f"all inputs must share one {_LAYOUT}")
        if t.dtype != ref.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}: all inputs must "
                             "share one dtype")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}: all inputs must be "
                             "on one device")


def _check_attention_inputs(tensors, fake: bool = False) -> None:
    """Validate (name, tensor) pairs for the kernels: ``_check_bhnd`` in a supported dtype, on a device
    the kernels run on, with a supported head dim and a grid that fits. ``fake``: called on FakeTensors
    while tracing (torch.compile), where the device is not launched on."""
    _check_bhnd(tensors, SUPPORTED_DTYPES)
    ref_name, ref = tensors[0]
    if not fake:
        if ref.device.type == "cpu":
            if not _INTERPRET:
                raise ValueError(
                    f"{ref_name} is a CPU tensor, but the Triton attention kernels run on the CPU only in "
                    "Triton's interpreter: set TRITON_INTERPRET=1 before kernels.attention is imported, use "
                    "CUDA tensors, or use the pure-torch attention_ref / attention_jvp_ref")
            check_no_bf16_dot_on_cpu("attention", ref.dtype, ref.device)
        elif ref.device.type != "cuda":
            raise ValueError(f"{ref_name} is on device {ref.device}; supported: cuda (cpu with TRITON_INTERPRET=1)")
    B, H, N, D = ref.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D = {D} (last dim of {ref_name}, read as {_LAYOUT}) is not supported; "
                         f"supported: {SUPPORTED_HEAD_DIMS}")
    if min(B, H, N) < 1:
        raise ValueError(f"{ref_name} has shape {tuple(ref.shape)}, read as {_LAYOUT}: B, H and N must be "
                         "at least 1")
    if B * H > _MAX_GRID_Y:
        raise ValueError(f"{ref_name} has shape {tuple(ref.shape)}, read as {_LAYOUT}: B·H = {B * H} > "
                         f"{_MAX_GRID_Y} (the CUDA grid's second axis, which runs over (b, h)); split the "
                         "batch, or check the layout (a (B, N, H, D) tensor reads N as H)")


def _unit_d(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any (B, H, N) strides but need stride 1 on D (coalesced, vectorised rows)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _empty_bnhd(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A (B, H, N, D) tensor stored as (B, N, H, D): the DiT's merge `o.transpose(1, 2).reshape(B, N, H·D)`
    is then a free view instead of a copy (flash SDPA returns this layout too)."""
    B, H, N, D = x.shape
    return x.new_empty((B, N, H, D), dtype=dtype or x.dtype).transpose(1, 2)


def _strides3(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2)


def _stride_align(*tensors: torch.Tensor) -> int:
    """The kernels' ALIGN: the largest power of 2 ≤ 8 dividing every (B, H, N) stride of ``tensors``
    (8 for the DiT's packed qkv and every contiguous layout at D = 32, 64, 72, 96, 128)."""
    return math.gcd(8, *(s for t in tensors for s in _strides3(t)))


def _head_dim_chunks(D: int) -> dict:
    """The kernels' head-dim chunks (see the conventions above): BLOCK_DLO = the largest power of 2 ≤ D;
    when D is not a power of 2, BLOCK_DHI covers the rest (≥ 16, tl.dot's minimum). Without a high
    chunk, BLOCK_DHI = 16 only shapes stand-in tensors that are never computed on."""
    lo = 1 << (D.bit_length() - 1)
    rest = D - lo
    return {"BLOCK_DLO": lo, "BLOCK_DHI": max(16, triton.next_power_of_2(rest)) if rest else 16,
            "SPLIT": rest > 0}


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: IEEE fp32 dots (TF32 would cost ~1e-3 relative error); fp16/bf16 ignore the option.
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_fwd(q, k, v, q_dot=None, k_dot=None, v_dot=None, scale: Optional[float] = None,
                  check: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Launch the forward kernel on (B, H, N, D) inputs. With the tangents (all three or none) it also
    computes Ȯ in the same pass. Returns (O, Ȯ or None, LSE), O and Ȯ (B, H, N, D) in the input dtype, LSE
    fp32 (B, H, N). ``check=False``: the caller has validated the inputs and passes the scale as a float."""
    has_tangent = q_dot is not None or k_dot is not None or v_dot is not None
    if check:
        if has_tangent and (q_dot is None or k_dot is None or v_dot is None):
            raise ValueError("q_dot, k_dot, v_dot must be given together (use zeros for a constant input)")
        named = [("q", q), ("k", k), ("v", v)]
        if has_tangent:
            named += [("q_dot", q_dot), ("k_dot", k_dot), ("v_dot", v_dot)]
        _check_attention_inputs(named)
        sm_scale = _resolve_scale(q, scale)
    else:
        sm_scale = scale

    q, k, v = _unit_d(q), _unit_d(k), _unit_d(v)
    B, H, N, D = q.shape
    o = _empty_bnhd(q)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    if has_tangent:
        qd, kd, vd = _unit_d(q_dot), _unit_d(k_dot), _unit_d(v_dot)
        od = _empty_bnhd(q)
    else:
        qd, kd, vd, od = q, k, v, o  # never read or written (HAS_TANGENT=False)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]), B * H)

    _attn_fwd_jvp_kernel[grid](
        q, k, v, qd, kd, vd, o, od, lse,
        *_strides3(q), *_strides3(k), *_strides3(v),
        *_strides3(qd), *_strides3(kd), *_strides3(vd),
        *_strides3(o), *_strides3(od),
        H, N, sm_scale,
        HEAD_DIM=D, **_head_dim_chunks(D), HAS_TANGENT=has_tangent,
        DOT_PRECISION=_dot_precision(q.dtype), ALIGN=_stride_align(q, k, v, qd, kd, vd, o, od),
    )
    return o, (od if has_tangent else None), lse


def attention_bwd(do, q, k, v, o, lse, scale: Optional[float] = None, out=None, check: bool = True):
    """FlashAttention-2 backward from (Q, K, V, O, LSE, dO), each (B, H, N, D) but LSE (B, H, N):
    Δ = rowsum(dO ⊙ O) first, then one kernel over key blocks for dK, dV and one over query blocks for
    dQ. Two passes recompute P twice (≈ 1.4× the FLOPs of the atomic single-pass variant) but need no
    atomics, no zero-filled fp32 dQ buffer, and are deterministic. Returns (dQ, dK, dV) in the input
    dtype, written into ``out`` = (dQ, dK, dV) when given ((B, H, N, D) tensors with unit stride on D,
    e.g. views of one packed gradient).
    ``check=False``: the caller has validated the inputs and passes the scale as a float."""
    if check:
        _check_attention_inputs([("q", q), ("k", k), ("v", v), ("o", o), ("do", do)])
        if lse.shape != q.shape[:3] or lse.dtype != torch.float32 or lse.device != q.device:
            raise ValueError(f"lse must be float32 of shape (B, H, N) = {tuple(q.shape[:3])} on {q.device}, "
                             f"got {lse.dtype} {tuple(lse.shape)} on {lse.device}")
        sm_scale = _resolve_scale(q, scale)
    else:
        sm_scale = scale
    q, k, v, o, do = _unit_d(q), _unit_d(k), _unit_d(v), _unit_d(o), _unit_d(do)
    lse = lse.contiguous()
    B, H, N, D = q.shape
    BLOCK_D = triton.next_power_of_2(D)
    precision = _dot_precision(q.dtype)

    delta = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    pre_block_m = 32 if _INTERPRET else 64
    _attn_bwd_preprocess_kernel[(triton.cdiv(N, pre_block_m), B * H)](
        o, do, delta, *_strides3(o), *_strides3(do), H, N,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, ALIGN=_stride_align(o, do), BLOCK_M=pre_block_m,
    )

    if out is None:
        dq, dk, dv = _empty_bnhd(q), _empty_bnhd(q), _empty_bnhd(q)
    else:
        dq, dk, dv = out
        for name, t in (("dq", dq), ("dk", dk), ("dv", dv)) if check else ():
            if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device or t.stride(-1) != 1:
                raise ValueError(f"out's {name} must be {q.dtype} (B, H, N, D) = {tuple(q.shape)} on {q.device} "
                                 f"with unit stride on D, got {t.dtype} {tuple(t.shape)} stride {t.stride()} on "
                                 f"{t.device}")

    align = _stride_align(q, k, v, do, dq, dk, dv)

    def grid_kv(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), B * H)

    _attn_bwd_dkdv_kernel[grid_kv](
        q, k, v, do, lse, delta, dk, dv,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dk), *_strides3(dv),
        H, N, sm_scale,
        HEAD_DIM=D, **_head_dim_chunks(D), DOT_PRECISION=precision, ALIGN=align,
    )

    def grid_q(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]), B * H)

    _attn_bwd_dq_kernel[grid_q](
        q, k, v, do, lse, delta, dq,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dq),
        H, N, sm_scale,
        HEAD_DIM=D, **_head_dim_chunks(D), DOT_PRECISION=precision, ALIGN=align,
    )
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Custom ops: the launchers as torch.library ops, opaque to torch.compile (which cannot trace into a
# Triton launch under the interpreter, and need not on a GPU). The autograd Functions below call these
# (``kernel_op``: the launcher directly in eager mode, the op under a tracer) on validated inputs.
# ---------------------------------------------------------------------------------------------
@kernel_op("meanflow_fast::attn_fwd")
def _attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    o, _, lse = attention_fwd(q, k, v, scale=scale, check=False)
    return o, lse


@_attn_fwd_op.register_fake
def _attn_fwd_fake(q, k, v, scale):
    _check_attention_inputs([("q", q), ("k", k), ("v", v)], fake=True)
    return _empty_bnhd(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@kernel_op("meanflow_fast::attn_fwd_jvp")
def _attn_fwd_jvp_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_dot: torch.Tensor,
                     k_dot: torch.Tensor, v_dot: torch.Tensor,
                     scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_fwd(q, k, v, q_dot, k_dot, v_dot, scale=scale, check=False)


@_attn_fwd_jvp_op.register_fake
def _attn_fwd_jvp_fake(q, k, v, q_dot, k_dot, v_dot, scale):
    _check_attention_inputs([("q", q), ("k", k), ("v", v), ("q_dot", q_dot), ("k_dot", k_dot), ("v_dot", v_dot)],
                  fake=True)
    return _empty_bnhd(q), _empty_bnhd(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@kernel_op("meanflow_fast::attn_bwd")
def _attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_bwd(do, q, k, v, o, lse, scale, check=False)


@_attn_bwd_op.register_fake
def _attn_bwd_fake(do, q, k, v, o, lse, scale):
    _check_attention_inputs([("q", q), ("k", k), ("v", v), ("o", o), ("do", do)], fake=True)
    return _empty_bnhd(q), _empty_bnhd(q), _empty_bnhd(q)


@kernel_op("meanflow_fast::attn_bwd_qkv")
def _attn_bwd_qkv_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                     lse: torch.Tensor, scale: float) -> torch.Tensor:
    """The backward into one packed (B, N, 3, H, D) gradient: the kernels write dQ, dK, dV straight into
    its three slices, so the gradient of the packed projection needs no stack and no copy."""
    B, H, N, D = q.shape
    dqkv = q.new_empty((B, N, 3, H, D))
    attention_bwd(do, q, k, v, o, lse, scale, out=tuple(dqkv[:, :, i].transpose(1, 2) for i in range(3)),
                  check=False)
    return dqkv


@_attn_bwd_qkv_op.register_fake
def _attn_bwd_qkv_fake(do, q, k, v, o, lse, scale):
    _check_attention_inputs([("q", q), ("k", k), ("v", v), ("o", o), ("do", do)], fake=True)
    B, H, N, D = q.shape
    return q.new_empty((B, N, 3, H, D))


# Reverse mode on the forward ops themselves (a compiled graph may call them directly), through the primal
# alone (docs/DESIGN.md, Backward): LSE and Ȯ are non-differentiable and get no zero-filled gradients;
# dO is None when O itself took no part in the loss.
def _attn_fwd_setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    o, lse = output[0], output[-1]
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = inputs[-1]
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _attn_bwd_or_none(ctx, do):
    if do is None:
        return None, None, None
    q, k, v, o, lse = ctx.saved_tensors
    return _attn_bwd_op(do, q, k, v, o, lse, ctx.scale)


def _attn_fwd_backward(ctx, do, *_):
    return (*_attn_bwd_or_none(ctx, do), None)


def _attn_fwd_jvp_backward(ctx, do, *_):
    return _attn_fwd_backward(ctx, do)[:3] + (None, None, None, None)


_attn_fwd_op.register_autograd(_attn_fwd_backward, setup_context=_attn_fwd_setup_context)
_attn_fwd_jvp_op.register_autograd(_attn_fwd_jvp_backward, setup_context=_attn_fwd_setup_context)


# ---------------------------------------------------------------------------------------------
# Autograd Functions (torch.func form: forward without ctx, setup_context; functorch transforms need that
# form). torch.func.jvp over them runs the fused kernel; torch.func.grad / vjp run the FlashAttention-2
# backward (one transform level: ``backward_once``, which says why).
# ---------------------------------------------------------------------------------------------
class AttentionJVPFunction(KernelFunction):
    """(O, Ȯ, LSE) from (Q, K, V, Q̇, K̇, V̇) by the fused kernel. Saves Q, K, V, O, LSE only; backward is the
    FlashAttention-2 primal backward. Ȯ and LSE are non-differentiable; LSE is an output only because
    setup_context sees nothing else of forward (``attention_jvp`` drops it)."""

    @staticmethod
    def forward(q, k, v, q_dot, k_dot, v_dot, scale):
        return _attn_fwd_jvp_op(q, k, v, q_dot, k_dot, v_dot, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v = inputs[:3]
        o, o_dot, lse = output
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = inputs[-1]
        ctx.mark_non_differentiable(o_dot, lse)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for Ȯ and LSE

    @staticmethod
    @backward_once
    def backward(ctx, do, _do_dot, _dlse):
        return (*_attn_bwd_or_none(ctx, do), None, None, None, None)


class AttentionQKVJVPFunction(KernelFunction):
    """(O, Ȯ, LSE) from the packed projection (B, N, 3·H·D) and its tangent: the DiT's form. Same kernels
    as AttentionJVPFunction; the gradient comes back packed, (B, N, 3·H·D), from one kernel-written
    buffer, where unbinding Q, K, V in autograd would stack three gradients and copy them again."""

    @staticmethod
    def forward(qkv, qkv_dot, num_heads, scale):
        return _attn_fwd_jvp_op(*_qkv_views(qkv, num_heads), *_qkv_views(qkv_dot, num_heads), scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        qkv, _, num_heads, scale = inputs
        o, o_dot, lse = output
        ctx.save_for_backward(qkv, o, lse)
        ctx.num_heads, ctx.scale = num_heads, scale
        ctx.mark_non_differentiable(o_dot, lse)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for Ȯ and LSE

    @staticmethod
    @backward_once
    def backward(ctx, do, _do_dot, _dlse):
        if do is None:
            return None, None, None, None
        qkv, o, lse = ctx.saved_tensors
        dqkv = _attn_bwd_qkv_op(do, *_qkv_views(qkv, ctx.num_heads), o, lse, ctx.scale)
        return dqkv.view(qkv.shape), None, None, None


@jvp_function(jvp_inputs=3)
class AttentionFunction(KernelFunction):
    """(O, LSE) = attention(Q, K, V) with reverse mode (FlashAttention-2 backward) and forward mode
    (``jvp`` runs the fused kernel), so torch.func.jvp / torch.autograd.forward_ad over a model calling
    ``attention`` use the fused kernel. LSE is non-differentiable (``attention`` drops it)."""

    @staticmethod
    def forward(q, k, v, scale):
        return _attn_fwd_op(q, k, v, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for LSE

    @staticmethod
    @backward_once
    def backward(ctx, do, _dlse):
        return (*_attn_bwd_or_none(ctx, do), None)

    @staticmethod
    def jvp(ctx, q_t, k_t, v_t, _scale_t):
        # ctx.saved_tensors holds Q, K, V (jvp_function). O is recomputed with Ȯ in one fused pass (4 of
        # its 6 matmuls are the tangent's): forward does not see the tangents.
        q, k, v = ctx.saved_tensors
        q_t, k_t, v_t = zeros_if_none(q_t, q), zeros_if_none(k_t, k), zeros_if_none(v_t, v)
        _check_attention_inputs([("q", q), ("k", k), ("v", v), ("q_dot", q_t), ("k_dot", k_t), ("v_dot", v_t)])
        _, o_dot, _ = _attn_fwd_jvp_op(q, k, v, q_t, k_t, v_t, ctx.scale)
        return o_dot, None


AttentionFunctionWithoutJvp = AttentionFunction.without_jvp


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------
def attention(q, k, v, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(scale·QKᵀ)·V for q, k, v (B, H, N, D) (batch, heads, tokens, head dim; fp32/fp16/bf16, D in
    SUPPORTED_HEAD_DIMS, any N ≥ 1, any strides), scale defaulting to 1/sqrt(D); O is (B, H, N, D).
    Differentiable in reverse and forward mode. A (B, N, H, D) tensor cannot be told apart by its shape
    (module docstring): transpose it first."""
    _check_attention_inputs([("q", q), ("k", k), ("v", v)])
    o, _ = pick_function(AttentionFunction, AttentionFunctionWithoutJvp).apply(q, k, v, _resolve_scale(q, scale))
    return o


def attention_jvp(q, k, v, q_dot, k_dot, v_dot,
                  scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(O, Ȯ) in one fused pass, q, k, v and their tangents all (B, H, N, D) (batch, heads, tokens, head
    dim; as ``attention``), as O and Ȯ. O is differentiable in Q, K, V; Ȯ carries no autograd graph."""
    _check_attention_inputs([("q", q), ("k", k), ("v", v), ("q_dot", q_dot), ("k_dot", k_dot), ("v_dot", v_dot)])
    o, o_dot, _ = AttentionJVPFunction.apply(q, k, v, q_dot, k_dot, v_dot,
                                             _resolve_scale(q, scale))
    return o, o_dot


def attention_jvp_qkv(qkv, qkv_dot, num_heads: int,
                      scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``attention_jvp`` on the packed projection: qkv and qkv_dot (B, N, 3·H·D), laid out (3, H, D)
    along the last dim (the DiT's qkv linear). Returns (O, Ȯ) of shape (B, H, N, D), stored as
    (B, N, H, D) so that merging the heads back to (B, N, H·D) is a view. The gradient of qkv is
    written by the kernels into one packed buffer."""
    _check_qkv("qkv", qkv, num_heads)
    _check_qkv("qkv_dot", qkv_dot, num_heads)
    q, k, v = _qkv_views(qkv, num_heads)
    q_dot, k_dot, v_dot = _qkv_views(qkv_dot, num_heads)
    _check_attention_inputs([("q", q), ("k", k), ("v", v), ("q_dot", q_dot), ("k_dot", k_dot), ("v_dot", v_dot)])
    o, o_dot, _ = AttentionQKVJVPFunction.apply(qkv, qkv_dot, num_heads, _resolve_scale(q, scale))
    return o, o_dot
