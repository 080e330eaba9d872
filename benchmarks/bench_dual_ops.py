"""Dual-stream ops at DiT-B/2 batch 128 (rows 128·256 = 32768, D 768, MLP hidden 3072), bf16.

    pytest benchmarks/bench_dual_ops.py --benchmark-only

One factory per op, parametrized by provider and by eager / torch.compile:

    triton     our fused kernel (forward + tangent in one pass)
    torch_jvp  torch.func.jvp over the pure-torch `<op>_ref` (tangent through the activations only)
    jvp_ref    the explicit pure-torch rules, `<op>_jvp_ref` (the DiT's `torch` backend)
    ref_fwd    `<op>_ref` forward alone: the primal cost, the floor a fused op is measured against

As in training, primal inputs and parameters require grad (the MLP kernel then also writes the
pre-activation for the backward). Each benchmark records in ``extra_info`` its median time, its
throughput from the formula next to the op (TFLOP/s for the MLP, GB/s of compulsory traffic for the
memory-bound ops) and its ratio to the eager ``ref_fwd`` of the same op.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (benchmarks time GPU kernels)", allow_module_level=True)

from benchmarks.common import bench_op, op_time_ms  # noqa: E402
from meanflow_fast.kernels import config  # noqa: E402
from meanflow_fast.kernels.gated_residual import (gated_residual_jvp, gated_residual_jvp_ref,  # noqa: E402
                                                  gated_residual_ref)
import meanflow_fast.kernels.gated_residual_ln as gated_ln_mod  # noqa: E402
from meanflow_fast.kernels.layernorm_modulate import ln_modulate_jvp, ln_modulate_jvp_ref, ln_modulate_ref  # noqa: E402
from meanflow_fast.kernels.linear import dual_linear_fwd  # noqa: E402
from meanflow_fast.kernels.mlp import gelu_bwd, mlp_jvp, mlp_jvp_ref, mlp_ref  # noqa: E402

B, N, D, HIDDEN = 128, 256, 768, 3072   # DiT-B/2, batch 128, 32×32 latents / patch 2 → 256 tokens
M = B * N
DTYPE = torch.bfloat16
PROVIDERS = ["triton", "torch_jvp", "jvp_ref", "ref_fwd"]
ELEM = torch.finfo(DTYPE).bits // 8

# Work formulas -----------------------------------------------------------------------------------
# MLP: each of fc1 and fc2 is 2·M·D·H FLOPs per stream; the tangent doubles it (ref_fwd: primal only).
MLP_FLOPS = {"fwd+tangent": 2 * 2 * 2 * M * D * HIDDEN, "fwd": 2 * 2 * M * D * HIDDEN}
# LN-modulate: read x, ẋ; write m, ṁ (+ fp32 mean and rstd for the backward); the (B, D) modulation
# tensors are negligible (4·B·D elements). ref_fwd: read x, write m.
LN_BYTES = {"fwd+tangent": 4 * M * D * ELEM + 2 * M * 4, "fwd": 2 * M * D * ELEM}
# Gated residual: read x, f, ẋ, ḟ; write y, ẏ (the (B, D) gates are negligible). ref_fwd: 2 reads, 1 write.
GATED_BYTES = {"fwd+tangent": 6 * M * D * ELEM, "fwd": 3 * M * D * ELEM}


def _rand(*shape, scale=1.0, grad=False):
    return (torch.randn(*shape, device="cuda") * scale).to(DTYPE).requires_grad_(grad)


def _run(benchmark, fn, compiled, work, unit, baseline):
    """Time one case (benchmarks.common.bench_op) at this file's shape."""
    bench_op(benchmark, fn, compiled, work, unit, baseline,
             f"rows {M}, D {D}" + (f", hidden {HIDDEN}" if unit == "TFLOP/s" else ""))


# =================================================================================================
#                                               MLP
# =================================================================================================
@pytest.fixture(scope="module")
def mlp_inputs():
    x, xd = _rand(B, N, D, grad=True), _rand(B, N, D)
    w1, b1 = _rand(HIDDEN, D, scale=D ** -0.5, grad=True), _rand(HIDDEN, grad=True)
    w2, b2 = _rand(D, HIDDEN, scale=HIDDEN ** -0.5, grad=True), _rand(D, grad=True)
    return x, w1, b1, w2, b2, xd


def _mlp_fn(provider, x, w1, b1, w2, b2, xd):
    if provider == "triton":
        return lambda: mlp_jvp(x, w1, b1, w2, b2, xd)
    if provider == "torch_jvp":
        return lambda: torch.func.jvp(lambda x_: mlp_ref(x_, w1, b1, w2, b2), (x,), (xd,))
    if provider == "jvp_ref":
        return lambda: mlp_jvp_ref(x, w1, b1, w2, b2, xd)
    return lambda: mlp_ref(x, w1, b1, w2, b2)


@pytest.fixture(scope="module")
def mlp_baseline(mlp_inputs):
    return op_time_ms(_mlp_fn("ref_fwd", *mlp_inputs))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_mlp_fwd_tangent(benchmark, provider, compiled, mlp_inputs, mlp_baseline):
    benchmark.group = "mlp fwd+tangent, DiT-B/2 b128 bf16"
    work = MLP_FLOPS["fwd" if provider == "ref_fwd" else "fwd+tangent"]
    _run(benchmark, _mlp_fn(provider, *mlp_inputs), compiled, work, "TFLOP/s", mlp_baseline)


# =================================================================================================
#                                          LN-modulate
# =================================================================================================
@pytest.fixture(scope="module")
def ln_inputs():
    x, xd = _rand(B, N, D, grad=True), _rand(B, N, D)
    mod, mod_dot = _rand(B, 6 * D, grad=True), _rand(B, 6 * D)  # chunk views, as in DiTBlock
    shift, scale = mod.chunk(6, dim=1)[:2]
    shift_d, scale_d = mod_dot.chunk(6, dim=1)[:2]
    return x, shift, scale, xd, shift_d, scale_d


def _ln_fn(provider, x, shift, scale, xd, shift_d, scale_d):
    eps = 1e-6
    if provider == "triton":
        return lambda: ln_modulate_jvp(x, shift, scale, xd, shift_d, scale_d, eps)
    if provider == "torch_jvp":
        return lambda: torch.func.jvp(lambda *p: ln_modulate_ref(*p, eps), (x, shift, scale), (xd, shift_d, scale_d))
    if provider == "jvp_ref":
        return lambda: ln_modulate_jvp_ref(x, shift, scale, xd, shift_d, scale_d, eps)
    return lambda: ln_modulate_ref(x, shift, scale, eps)


@pytest.fixture(scope="module")
def ln_baseline(ln_inputs):
    return op_time_ms(_ln_fn("ref_fwd", *ln_inputs))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_ln_modulate_fwd_tangent(benchmark, provider, compiled, ln_inputs, ln_baseline):
    benchmark.group = "ln_modulate fwd+tangent, DiT-B/2 b128 bf16"
    work = LN_BYTES["fwd" if provider == "ref_fwd" else "fwd+tangent"]
    _run(benchmark, _ln_fn(provider, *ln_inputs), compiled, work, "GB/s", ln_baseline)


# =================================================================================================
#                                         Gated residual
# =================================================================================================
@pytest.fixture(scope="module")
def gated_inputs():
    x, f, xd, fd = _rand(B, N, D, grad=True), _rand(B, N, D, grad=True), _rand(B, N, D), _rand(B, N, D)
    gate = _rand(B, 6 * D, grad=True).chunk(6, dim=1)[2]
    gate_d = _rand(B, 6 * D).chunk(6, dim=1)[2]
    return x, gate, f, xd, gate_d, fd


def _gated_fn(provider, x, gate, f, xd, gate_d, fd):
    if provider == "triton":
        return lambda: gated_residual_jvp(x, gate, f, xd, gate_d, fd)
    if provider == "torch_jvp":
        return lambda: torch.func.jvp(gated_residual_ref, (x, gate, f), (xd, gate_d, fd))
    if provider == "jvp_ref":
        return lambda: gated_residual_jvp_ref(x, gate, f, xd, gate_d, fd)
    return lambda: gated_residual_ref(x, gate, f)


@pytest.fixture(scope="module")
def gated_baseline(gated_inputs):
    return op_time_ms(_gated_fn("ref_fwd", *gated_inputs))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_gated_residual_fwd_tangent(benchmark, provider, compiled, gated_inputs, gated_baseline):
    benchmark.group = "gated_residual fwd+tangent, DiT-B/2 b128 bf16"
    work = GATED_BYTES["fwd" if provider == "ref_fwd" else "fwd+tangent"]
    _run(benchmark, _gated_fn(provider, *gated_inputs), compiled, work, "GB/s", gated_baseline)


# =================================================================================================
#      Dual linear without epilogue: the Triton kernel vs cuBLAS (the config switch plain_dual_linear)
# =================================================================================================
LINEAR_SHAPES = {"qkv": (D, 3 * D), "proj": (D, D), "fc2": (HIDDEN, D)}  # (in, out)


@pytest.mark.parametrize("impl", ["triton", "cublas"])
@pytest.mark.parametrize("layer", list(LINEAR_SHAPES))
def test_dual_linear(benchmark, layer, impl):
    k, n_out = LINEAR_SHAPES[layer]
    x, xd = _rand(M, k), _rand(M, k)
    w, b = _rand(n_out, k, scale=k ** -0.5), _rand(n_out)
    baseline = op_time_ms(lambda: torch.nn.functional.linear(x, w, b))  # one stream on cuBLAS
    benchmark.group = f"dual linear {layer} ({k}→{n_out}), rows {M}, bf16"
    _run(benchmark, lambda: dual_linear_fwd(x, w, b, xd, impl=impl), False, 2 * 2 * M * k * n_out, "TFLOP/s",
         baseline)


# =================================================================================================
#     The MLP backward's elementwise part: kernels.mlp.gelu_bwd vs the three torch kernels it replaces
# =================================================================================================
def _gelu_bwd_torch(dh, a):
    """What the MLP backward ran before gelu_bwd: aten's GELU backward, h recomputed for dW2, db1."""
    da = torch.ops.aten.gelu_backward(dh, a, approximate="tanh")
    return da, torch.nn.functional.gelu(a, approximate="tanh"), da.sum(0)


@pytest.mark.parametrize("provider", ["triton", "torch", "torch_compiled"])
def test_gelu_bwd(benchmark, provider):
    dh, a = _rand(M, HIDDEN), _rand(M, HIDDEN)
    baseline = op_time_ms(lambda: _gelu_bwd_torch(dh, a))
    benchmark.group = f"MLP backward GELU pass (da, h, db1), rows {M}, hidden {HIDDEN}, bf16"
    fn = {"triton": gelu_bwd, "torch": _gelu_bwd_torch, "torch_compiled": _gelu_bwd_torch}[provider]
    # compulsory traffic: read dh and a, write da and h (the db partial sums are ~6 % more for ours)
    _run(benchmark, lambda: fn(dh, a), provider == "torch_compiled", 4 * M * HIDDEN * ELEM, "GB/s", baseline)


# =================================================================================================
#   Gated residual fused with the next LN-modulate vs the two kernels apart (the config switch residual_ln)
# =================================================================================================
@pytest.mark.parametrize("provider", ["fused", "apart", "jvp_ref"])
def test_gated_residual_ln_fwd_tangent(benchmark, provider, gated_inputs):
    x, gate, f, xd, gate_d, fd = gated_inputs
    mod, mod_d = _rand(B, 6 * D, grad=True).chunk(6, dim=1), _rand(B, 6 * D).chunk(6, dim=1)
    args = (x, gate, f, mod[3], mod[4], xd, gate_d, fd, mod_d[3], mod_d[4], 1e-6)
    switch = config.override(residual_ln="fused" if provider == "fused" else "apart")
    fn = gated_ln_mod.gated_residual_ln_jvp_ref if provider == "jvp_ref" else gated_ln_mod.gated_residual_ln_jvp
    baseline = op_time_ms(lambda: gated_ln_mod.gated_residual_ln_ref(*args[:5]))
    benchmark.group = "gated_residual + ln_modulate fwd+tangent, DiT-B/2 b128 bf16"
    # compulsory traffic: read x, f, ẋ, ḟ; write y, ẏ, m, ṁ (the apart kernels also re-read y and ẏ)
    with switch:
        _run(benchmark, lambda: fn(*args), False, 8 * M * D * ELEM + 2 * M * 4, "GB/s", baseline)


# =================================================================================================
#   The plain forward's ops without grad (the guided target's no-grad forward on 2B rows, the sampler)
# =================================================================================================
@pytest.mark.parametrize("provider", ["cublaslt", "triton", "torch", "torch_compiled"])
def test_mlp_plain_no_grad(benchmark, provider, mlp_inputs):
    """fc1 + GELU on cuBLASLt's GELU epilogue vs the Triton GEMM (the config switch no_grad_fc1), fc2 on
    cuBLAS either way; torch: eager and compiled ``mlp_ref``."""
    from meanflow_fast.kernels.mlp import mlp
    x, w1, b1, w2, b2, _ = (t.detach() for t in mlp_inputs)
    switch = config.override(no_grad_fc1=provider if provider in ("cublaslt", "triton") else "cublaslt")
    if provider in ("cublaslt", "triton"):
        fn = mlp
    else:
        fn = mlp_ref
    baseline = op_time_ms(lambda: mlp_ref(x, w1, b1, w2, b2))
    benchmark.group = "mlp plain forward, no grad, DiT-B/2 b128 bf16"
    with torch.no_grad(), switch:
        _run(benchmark, lambda: fn(x, w1, b1, w2, b2), provider == "torch_compiled", MLP_FLOPS["fwd"], "TFLOP/s",
             baseline)


@pytest.mark.parametrize("provider", ["fused", "apart", "torch", "torch_compiled"])
def test_gated_residual_ln_plain_no_grad(benchmark, provider, gated_inputs):
    """The plain forward's gated residual + next LN-modulate: one kernel (``gated_residual_ln``) vs the
    two primal kernels apart (``residual_ln="apart"``) vs torch eager and compiled."""
    x, gate, f = (t.detach() for t in gated_inputs[:3])
    shift, scale = _rand(B, 6 * D).chunk(6, dim=1)[3:5]
    args = (x, gate, f, shift, scale, 1e-6)
    switch = config.override(residual_ln="apart" if provider == "apart" else "fused")
    fn = gated_ln_mod.gated_residual_ln if provider in ("fused", "apart") else gated_ln_mod.gated_residual_ln_ref
    baseline = op_time_ms(lambda: gated_ln_mod.gated_residual_ln_ref(*args))
    benchmark.group = "gated_residual + ln_modulate plain forward, no grad, DiT-B/2 b128 bf16"
    # compulsory traffic: read x, f; write y, m (+ the fp32 row statistics)
    with torch.no_grad(), switch:
        _run(benchmark, lambda: fn(*args), provider == "torch_compiled", 4 * M * D * ELEM + 2 * M * 4, "GB/s",
             baseline)
