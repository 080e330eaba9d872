"""The iMF block's ops with tangents at iMF-B/2 batch 128 (B 128, N 276 = 20 prefix + 256 patch tokens,
D 768, 12 heads of 64, SwiGLU hidden 2048), bf16.

    pytest benchmarks/bench_imf_ops.py --benchmark-only

One factory per op, parametrized by provider and by eager / torch.compile, as bench_dual_ops.py:

    triton     our fused kernel (forward + tangent in one pass)
    torch_jvp  torch.func.jvp over the pure-torch reference (the ``*_ref`` beside each kernel; the attention's
               ``attention_ref``)
    jvp_ref    the explicit pure-torch rules (``*_jvp_ref``: the iMF model's ``torch`` backend)
    ref_fwd    the reference's forward alone: the primal cost, the floor a fused op is measured against

The ops: ``rms_norm``, ``gated_residual_rmsnorm`` (the block's residual update + the next RMSNorm),
``qk_norm_rope`` (q and k as the (B, N, H, D) views of the projections' outputs, as in the model),
``swiglu`` (rows B·N, 768 → 2048 → 768) and ``attention`` (B 128, H 12, N 276, D 64; here ref_fwd is
flash SDPA's forward, the floor a user has, and ``attention_ref`` is its own provider ``ref_math_fwd``).
As in training, primal inputs and parameters require grad. Each benchmark records in ``extra_info`` its
median time, its throughput from the formula next to the op (TFLOP/s for SwiGLU and attention, GB/s of
compulsory traffic for the row ops) and its ratio to the eager ``ref_fwd`` of the same op.

Then an A/B of the attention's q, k, v projections on the dual stream (``test_qkv_projections``, at the
iMF cases of benchmarks/common.py, ``IMF_CASES``): three dual linears, one per projection, as
``IMFAttention.forward_jvp`` runs them, against one dual linear over the concatenated weights.

Last, the SwiGLU backward's elementwise pass (``test_swiglu_bwd``, at the ``IMF_CASES``): kernels.swiglu's
``swiglu_bwd`` (one Triton pass from dg, a, b to da, db, g) against the same math as torch elementwise ops in
fp32, eager and torch.compile'd.

``make_inputs``, ``op_fn``, ``qkv_inputs``, ``qkv_fn``, ``swiglu_bwd_inputs`` and ``swiglu_bwd_fn`` take any
shape, dtype and device: tests/test_benchmark_tools.py runs every provider at small fp32 shapes in Triton's
interpreter (CPU) against the others or a reference. Without a GPU the benchmarks themselves skip
(benchmarks/conftest.py).
"""
from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.nn.functional as F

from benchmarks.common import IMF_CASES, IMF_PREFIX, bench_op, imf_shape, op_time_ms
from meanflow_fast.kernels import config
from meanflow_fast.kernels.attention import attention_jvp, attention_jvp_ref, attention_ref
from meanflow_fast.kernels.linear import linear_jvp
from meanflow_fast.kernels.qk_norm_rope import qk_norm_rope_jvp, qk_norm_rope_jvp_ref, qk_norm_rope_ref, rope_cos_sin
from meanflow_fast.kernels.rmsnorm import (gated_residual_rmsnorm_jvp, gated_residual_rmsnorm_jvp_ref,
                                           gated_residual_rmsnorm_ref, rms_norm_jvp, rms_norm_jvp_ref, rms_norm_ref)
from meanflow_fast.kernels.swiglu import swiglu_bwd, swiglu_jvp, swiglu_jvp_ref, swiglu_ref

B, N, D, HEADS, HIDDEN = 128, 276, 768, 12, 2048   # iMF-B/2, batch 128: 32×32 latents / patch 2 + 20 prefix
HEAD_DIM = D // HEADS
M = B * N
DTYPE = torch.bfloat16
PROVIDERS = ["triton", "torch_jvp", "jvp_ref", "ref_fwd"]
OPS = ("rms_norm", "gated_residual_rmsnorm", "qk_norm_rope", "swiglu", "attention")
EPS = 1e-6


# Work formulas -----------------------------------------------------------------------------------
def work(op: str, provider: str, shape: Dict[str, int], elem: int) -> Tuple[float, str]:
    """(amount, unit) of one call: FLOPs for the matmul ops, bytes of compulsory traffic for the row ops
    (the (D,) weights and gates, the fp32 row statistics and the (N, D/2) RoPE tables are left out).
    ``provider`` "ref_fwd" (and attention's "ref_math_fwd") count the primal stream alone."""
    b, n, d, h, hd, hidden = (shape[k] for k in ("B", "N", "D", "HEADS", "HEAD_DIM", "HIDDEN"))
    m = b * n
    primal = provider in ("ref_fwd", "ref_math_fwd")
    streams = 1 if primal else 2
    if op == "rms_norm":                  # read x (ẋ), write y (ẏ)
        return 2 * streams * m * d * elem, "GB/s"
    if op == "gated_residual_rmsnorm":    # read x, f (ẋ, ḟ); write h, m (ḣ, ṁ)
        return 4 * streams * m * d * elem, "GB/s"
    if op == "qk_norm_rope":              # read q, k (q̇, k̇); write q', k' (q̇', k̇')
        return 4 * streams * m * d * elem, "GB/s"
    if op == "swiglu":                    # three D×HIDDEN matmuls per stream
        return 3 * 2 * m * d * hidden * streams, "TFLOP/s"
    if op == "attention":                 # QKᵀ and PV; with the tangent 3× (Q̇Kᵀ, QK̇ᵀ, ṖV, PV̇)
        return 4 * b * h * n * n * hd * (1 if primal else 3), "TFLOP/s"
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


SHAPE = dict(B=B, N=N, D=D, HEADS=HEADS, HEAD_DIM=HEAD_DIM, HIDDEN=HIDDEN)


# Inputs and the providers' callables -------------------------------------------------------------
def make_inputs(op: str, shape: Dict[str, int], dtype=DTYPE, device="cuda", seed: int = 0) -> tuple:
    """The op's arguments, primal inputs and parameters requiring grad (tangents do not), at ``shape``."""
    g = torch.Generator(device=device).manual_seed(seed)
    b, n, d, h, hd, hidden = (shape[k] for k in ("B", "N", "D", "HEADS", "HEAD_DIM", "HIDDEN"))

    def rand(*s, scale=1.0, grad=False, offset=0.0):
        t = torch.randn(*s, device=device, generator=g) * scale + offset
        return t.to(dtype).requires_grad_(grad)

    if op == "rms_norm":
        return rand(b, n, d, grad=True), rand(d, scale=0.1, offset=1.0, grad=True), rand(b, n, d)
    if op == "gated_residual_rmsnorm":
        x, f = rand(b, n, d, grad=True), rand(b, n, d, grad=True)
        gate, weight = rand(d, scale=0.1, grad=True), rand(d, scale=0.1, offset=1.0, grad=True)
        return x, f, gate, weight, rand(b, n, d), rand(b, n, d)
    if op == "qk_norm_rope":
        # the model's q and k: (B, N, H, D_h) views of the (B, N, D) projections (contiguous here)
        q, k = (rand(b, n, d, grad=True).unflatten(-1, (h, hd)) for _ in range(2))
        qw, kw = (rand(hd, scale=0.1, offset=1.0, grad=True) for _ in range(2))
        cos, sin = rope_cos_sin(n, hd, device=device)
        q_dot, k_dot = (rand(b, n, d).unflatten(-1, (h, hd)) for _ in range(2))
        return q, k, qw, kw, cos, sin, q_dot, k_dot
    if op == "swiglu":
        x = rand(b * n, d, grad=True)
        w1, w3 = (rand(hidden, d, scale=d ** -0.5, grad=True) for _ in range(2))
        w2 = rand(d, hidden, scale=hidden ** -0.5, grad=True)
        return x, w1, w3, w2, rand(b * n, d)
    if op == "attention":
        q, k, v = (rand(b, h, n, hd, grad=True) for _ in range(3))
        return (q, k, v) + tuple(rand(b, h, n, hd) for _ in range(3))
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def op_fn(op: str, provider: str, args: tuple) -> Callable:
    """The callable a provider times on ``args`` (``make_inputs``): fwd+tangent providers return the
    primal outputs and the tangents (for ``torch_jvp``: torch.func.jvp's (outputs, tangents)), ``ref_fwd``
    the primal outputs."""
    if op == "rms_norm":
        x, w, xd = args
        return {"triton": lambda: rms_norm_jvp(x, w, xd, EPS),
                "torch_jvp": lambda: torch.func.jvp(lambda x_: rms_norm_ref(x_, w, EPS), (x,), (xd,)),
                "jvp_ref": lambda: rms_norm_jvp_ref(x, w, xd, EPS),
                "ref_fwd": lambda: rms_norm_ref(x, w, EPS)}[provider]
    if op == "gated_residual_rmsnorm":
        x, f, gate, w, xd, fd = args
        return {"triton": lambda: gated_residual_rmsnorm_jvp(x, f, gate, w, xd, fd, EPS),
                "torch_jvp": lambda: torch.func.jvp(lambda x_, f_: gated_residual_rmsnorm_ref(x_, f_, gate, w, EPS),
                                                    (x, f), (xd, fd)),
                "jvp_ref": lambda: gated_residual_rmsnorm_jvp_ref(x, f, gate, w, xd, fd, EPS),
                "ref_fwd": lambda: gated_residual_rmsnorm_ref(x, f, gate, w, EPS)}[provider]
    if op == "qk_norm_rope":
        q, k, qw, kw, cos, sin, qd, kd = args
        return {"triton": lambda: qk_norm_rope_jvp(q, k, qw, kw, cos, sin, qd, kd, EPS),
                "torch_jvp": lambda: torch.func.jvp(lambda q_, k_: qk_norm_rope_ref(q_, k_, qw, kw, cos, sin, EPS),
                                                    (q, k), (qd, kd)),
                "jvp_ref": lambda: qk_norm_rope_jvp_ref(q, k, qw, kw, cos, sin, qd, kd, EPS),
                "ref_fwd": lambda: qk_norm_rope_ref(q, k, qw, kw, cos, sin, EPS)}[provider]
    if op == "swiglu":
        x, w1, w3, w2, xd = args
        return {"triton": lambda: swiglu_jvp(x, w1, w3, w2, xd),
                "torch_jvp": lambda: torch.func.jvp(lambda x_: swiglu_ref(x_, w1, w3, w2), (x,), (xd,)),
                "jvp_ref": lambda: swiglu_jvp_ref(x, w1, w3, w2, xd),
                "ref_fwd": lambda: swiglu_ref(x, w1, w3, w2)}[provider]
    if op == "attention":
        q, k, v, qd, kd, vd = args
        return {"triton": lambda: attention_jvp(q, k, v, qd, kd, vd),
                "torch_jvp": lambda: torch.func.jvp(attention_ref, (q, k, v), (qd, kd, vd)),
                "jvp_ref": lambda: attention_jvp_ref(q, k, v, qd, kd, vd),
                "ref_fwd": lambda: F.scaled_dot_product_attention(q, k, v),
                "ref_math_fwd": lambda: attention_ref(q, k, v)}[provider]
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


# Timing (CUDA) -------------------------------------------------------------------------------------
def _run(benchmark, op, provider, compiled, args, baseline):
    """Time one provider of one op (benchmarks.common.bench_op) at this file's shape."""
    amount, unit = work(op, provider, SHAPE, torch.finfo(DTYPE).bits // 8)
    bench_op(benchmark, op_fn(op, provider, args), compiled, amount, unit, baseline,
             f"B {B}, N {N}, D {D}, heads {HEADS}×{HEAD_DIM}, hidden {HIDDEN}")


@pytest.fixture(scope="module")
def inputs():
    cache = {}

    def get(op):
        if op not in cache:
            cache[op] = make_inputs(op, SHAPE)
        return cache[op]
    return get


@pytest.fixture(scope="module")
def baseline(inputs):
    cache = {}

    def get(op):
        if op not in cache:
            cache[op] = op_time_ms(op_fn(op, "ref_fwd", inputs(op)))
        return cache[op]
    return get


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", OPS)
def test_imf_op_fwd_tangent(benchmark, op, provider, compiled, inputs, baseline):
    benchmark.group = f"{op} fwd+tangent, iMF-B/2 b128 bf16"
    _run(benchmark, op, provider, compiled, inputs(op), baseline(op))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_attention_ref_math_fwd(benchmark, compiled, inputs, baseline):
    """attention_ref's forward (the reference's math, fp32 softmax): the primal cost of the torch_jvp and
    jvp_ref providers' own forward, next to flash SDPA's (ref_fwd)."""
    benchmark.group = "attention fwd+tangent, iMF-B/2 b128 bf16"
    _run(benchmark, "attention", "ref_math_fwd", compiled, inputs("attention"), baseline("attention"))


# =================================================================================================
#     The attention's q, k, v projections on the dual stream: three dual linears vs one, packed
# =================================================================================================
# "separate": IMFAttention.forward_jvp today, three dual linears (the iMF dual table's ``linear``:
# kernels.linear.linear_jvp, no bias) on the same (x, ẋ). "packed": one dual linear over torch.cat([Wq, Wk,
# Wv]), concatenated inside every call (the weights are three parameters: a packed model would concatenate
# per call, and the cat's backward splits dW), then q, k, v as column slices of (y, ẏ). The pass "fwd"
# times the forward (both streams), "fwd_bwd" adds the backward of q, k, v into x and the three weights.
# Dual linear impl: "cublas" (the default of the switch plain_dual_linear: two cuBLAS GEMMs) or "triton"
# (the dual-stream Triton GEMM). Baseline of ``x_eager_ref_fwd``: the primal alone, one GEMM of x with the
# concatenated weight; packed cases also record ``x_separate``, their time over the separate layout's
# measured in the same case.
QKV_LAYOUTS = ("separate", "packed")
QKV_PASSES = ("fwd", "fwd_bwd")


def qkv_work(pass_: str, shape: Dict[str, int]) -> float:
    """FLOPs of one call: the three D×D projections, 2·B·N·D² each, on the primal and the tangent stream;
    ``fwd_bwd`` adds dx and dW of the primal (two more GEMMs of the same size per projection)."""
    if pass_ not in QKV_PASSES:
        raise ValueError(f"pass_ must be one of {QKV_PASSES}, got {pass_!r}")
    m, d = shape["B"] * shape["N"], shape["D"]
    return 3 * 2 * m * d * d * (2 if pass_ == "fwd" else 4)


def qkv_inputs(shape: Dict[str, int], dtype=DTYPE, device="cuda", seed: int = 0) -> tuple:
    """(x, ẋ, (Wq, Wk, Wv), (dq, dk, dv)): x (B, N, D) and the (D, D) weights requiring grad (ẋ does not), and
    the upstream gradients of q, k, v that the backward pass takes."""
    g = torch.Generator(device=device).manual_seed(seed)
    b, n, d = shape["B"], shape["N"], shape["D"]

    def rand(*s, scale=1.0, grad=False):
        return (torch.randn(*s, device=device, generator=g) * scale).to(dtype).requires_grad_(grad)
    x, x_dot = rand(b, n, d, grad=True), rand(b, n, d)
    weights = tuple(rand(d, d, scale=d ** -0.5, grad=True) for _ in range(3))
    return x, x_dot, weights, tuple(rand(b, n, d) for _ in range(3))


def qkv_fn(layout: str, pass_: str, args: tuple) -> Callable:
    """The timed call of (layout, pass) on ``qkv_inputs``: returns ((q, k, v), (q̇, k̇, v̇)), and with
    ``fwd_bwd`` also the gradients (dx, dWq, dWk, dWv)."""
    if layout not in QKV_LAYOUTS:
        raise ValueError(f"layout must be one of {QKV_LAYOUTS}, got {layout!r}")
    if pass_ not in QKV_PASSES:
        raise ValueError(f"pass_ must be one of {QKV_PASSES}, got {pass_!r}")
    x, x_dot, weights, grads = args
    d = weights[0].shape[0]

    def project():
        if layout == "separate":
            outs = [linear_jvp(x, w, None, x_dot) for w in weights]
            return tuple(y for y, _ in outs), tuple(y_dot for _, y_dot in outs)
        y, y_dot = linear_jvp(x, torch.cat(weights), None, x_dot)
        return y.split(d, dim=-1), y_dot.split(d, dim=-1)

    if pass_ == "fwd":
        return project

    def forward_backward():
        qkv, tangents = project()
        return qkv, tangents, torch.autograd.grad(qkv, (x, *weights), grads)
    return forward_backward


def _qkv_case_id(case) -> str:
    return f"{IMF_PREFIX}{case[0]}-b{case[1]}"


@pytest.mark.parametrize("layout", QKV_LAYOUTS)
@pytest.mark.parametrize("impl", ["cublas", "triton"])
@pytest.mark.parametrize("pass_", QKV_PASSES)
@pytest.mark.parametrize("case", IMF_CASES, ids=_qkv_case_id)
def test_qkv_projections(benchmark, case, pass_, impl, layout):
    shape = imf_shape(*case)
    args = qkv_inputs(shape)
    x, _, weights, _ = args
    packed_weight = torch.cat(weights).detach()
    benchmark.group = f"attention q, k, v projections {pass_}, {_qkv_case_id(case)} bf16, dual linear {impl}"
    baseline = op_time_ms(lambda: F.linear(x, packed_weight))
    with config.override(plain_dual_linear=impl):
        bench_op(benchmark, qkv_fn(layout, pass_, args), False, qkv_work(pass_, shape), "TFLOP/s", baseline,
                 f"B {shape['B']}, N {shape['N']}, D {shape['D']}")
        if layout == "packed":  # the A/B ratio, both sides warm and timed alike
            separate = qkv_fn("separate", pass_, args)
            separate()
            separate_ms = op_time_ms(separate)
            benchmark.extra_info["x_separate"] = round(op_time_ms(qkv_fn("packed", pass_, args)) / separate_ms, 3)


# =================================================================================================
#     The SwiGLU backward's elementwise pass: kernels.swiglu.swiglu_bwd vs torch elementwise ops
# =================================================================================================
# From dg (the gradient of g = silu(a) ⊙ b, the dy W2 GEMM's output) and the saved a, b: da = dg ⊙ b ⊙ silu'(a),
# db = dg ⊙ silu(a) and the g that dW2 needs. "triton": the one-pass kernel; "torch": the same math as torch
# elementwise ops in fp32 (``_swiglu_bwd_torch``), eager; "torch_compiled": that function through
# torch.compile. Baseline of ``x_eager_ref_fwd``: eager torch.
SWIGLU_BWD_PROVIDERS = ("triton", "torch", "torch_compiled")


def swiglu_bwd_work(shape: Dict[str, int], elem: int) -> float:
    """Bytes of compulsory traffic of one call: read dg, a, b and write da, db, g, each (B·N, HIDDEN)."""
    return 6 * shape["B"] * shape["N"] * shape["HIDDEN"] * elem


def swiglu_bwd_inputs(shape: Dict[str, int], dtype=DTYPE, device="cuda", seed: int = 0) -> tuple:
    """(dg, a, b): (B·N, HIDDEN) each, as the backward passes them (contiguous rows, no grad)."""
    g = torch.Generator(device=device).manual_seed(seed)
    m, hidden = shape["B"] * shape["N"], shape["HIDDEN"]
    return tuple(torch.randn(m, hidden, device=device, generator=g).to(dtype) for _ in range(3))


def _swiglu_bwd_torch(dg, a, b):
    """(da, db, g) by torch elementwise ops, fp32 math, results in a's dtype."""
    dgf, af, bf = dg.float(), a.float(), b.float()
    s = torch.sigmoid(af)
    silu = af * s
    da = dgf * bf * s * (1 + af * (1 - s))
    return da.to(a.dtype), (dgf * silu).to(a.dtype), (silu * bf).to(a.dtype)


def swiglu_bwd_fn(provider: str, args: tuple) -> Callable:
    """The timed call of ``provider`` on ``swiglu_bwd_inputs``: returns (da, db, g). "torch_compiled" gives the
    eager function; the benchmark compiles it (benchmarks.common.bench_op)."""
    if provider not in SWIGLU_BWD_PROVIDERS:
        raise ValueError(f"provider must be one of {SWIGLU_BWD_PROVIDERS}, got {provider!r}")
    dg, a, b = args
    if provider == "triton":
        return lambda: swiglu_bwd(dg, a, b)
    return lambda: _swiglu_bwd_torch(dg, a, b)


@pytest.mark.parametrize("provider", SWIGLU_BWD_PROVIDERS)
@pytest.mark.parametrize("case", IMF_CASES, ids=_qkv_case_id)
def test_swiglu_bwd(benchmark, case, provider):
    shape = imf_shape(*case)
    args = swiglu_bwd_inputs(shape)
    m, hidden = shape["B"] * shape["N"], shape["HIDDEN"]
    benchmark.group = f"SwiGLU backward pass (da, db, g), {_qkv_case_id(case)} rows {m}, hidden {hidden}, bf16"
    baseline = op_time_ms(swiglu_bwd_fn("torch", args))
    bench_op(benchmark, swiglu_bwd_fn(provider, args), provider == "torch_compiled",
             swiglu_bwd_work(shape, torch.finfo(DTYPE).bits // 8), "GB/s", baseline, f"rows {m}, hidden {hidden}")
