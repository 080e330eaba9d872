"""The fused MLP (kernels/mlp.py): ``mlp_jvp`` with tangents, ``mlp`` of the plain forward (fc1 + GELU in
Triton or cuBLASLt, fc2 on cuBLAS) and the backward's fused GELU pass ``gelu_bwd``, against fp64 references
with the rule and cases of tests/kernels/cases.py."""
import importlib

import pytest
import torch

from meanflow_fast.kernels import config
from meanflow_fast.kernels.linear import dual_linear_fwd
from meanflow_fast.kernels.mlp import (gelu_bwd, gelu_tanh_grad, mlp, mlp_fwd, mlp_jvp, mlp_jvp_fwd, mlp_jvp_ref,
                                       mlp_ref)
from tests.helpers import HAS_CUDA, OpLog, assert_within_torch, rel_err, requires_cuda
from tests.kernels.cases import (DEVICE, FLOOR, OPS, bad_call_params,
                                 check_backward_saves_nothing_of_the_tangent_stream, check_bf16_dit_b2,
                                 check_func_jvp_over_primal, check_jvp_ref_matches_func_jvp,
                                 check_kernel_matches_reference, check_primal_bf16_dit_b2,
                                 check_primal_kernel_matches_reference, check_primal_saves, check_raises_value_error,
                                 dit_case, f32, factor, fp32_matmuls, jvp_args, kernel_cases, make_mlp, rand, strided,
                                 to, torch_func_cases)


# =================================================================================================
#                              With tangents: mlp_jvp
# =================================================================================================
def test_jvp_ref_matches_func_jvp():
    check_jvp_ref_matches_func_jvp("mlp")


@pytest.mark.parametrize("dtype,shape,strided", kernel_cases("mlp"))
def test_kernel_matches_reference(dtype, shape, strided):
    check_kernel_matches_reference("mlp", dtype, shape, strided)


def test_backward_saves_nothing_of_the_tangent_stream():
    check_backward_saves_nothing_of_the_tangent_stream("mlp", 4)  # x, a, W1, W2


def test_mlp_without_grad_skips_the_pre_activation():
    case = make_mlp(((2, 5), 40, 72), torch.float32, False)
    with torch.no_grad():
        y, y_dot = mlp_jvp(*jvp_args(case))
    y_ref, yd_ref = mlp_jvp_ref(*jvp_args(case))
    assert rel_err(y, y_ref) < 1e-5 and rel_err(y_dot, yd_ref) < 1e-5


@requires_cuda
def test_bf16_dit_b2_shapes_on_gpu():
    check_bf16_dit_b2("mlp")


@requires_cuda
def test_bf16_dual_linear_kernel_on_gpu():
    """The same check with the Triton dual GEMM for fc2 (3072→768), which CUDA otherwise sends to cuBLAS
    (the config switch plain_dual_linear)."""
    with config.override(plain_dual_linear="triton"):
        check_bf16_dit_b2("mlp")


# =================================================================================================
#                     The backward's fused GELU pass: gelu_bwd
# =================================================================================================
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(150, 100), (37, 1030), (1, 300)])
def test_gelu_bwd(dtype, shape):
    """The MLP backward's fused pass (da = gelu'(a) ⊙ dh, h = gelu(a), db = Σ_rows da) against fp64, each
    within 2× the error of torch's three kernels at the same precision. Shapes: 150 rows = 3 programs
    of 4 row steps with a masked tail (the interpreter's 64-row programs); 1030 features = two column
    blocks, the second 6 wide; one row of 300. dh is a column slice, a a column-major view (read in place)."""
    _check_gelu_bwd(dtype, shape)


@requires_cuda
def test_gelu_bwd_bf16_dit_b2_on_gpu():
    """bf16 at the DiT-B/2 MLP's hidden size (B 4 × N 256 rows, hidden 3072)."""
    _check_gelu_bwd(torch.bfloat16, (1024, 3072))


def _check_gelu_bwd(dtype, shape):
    from meanflow_fast.kernels.mlp import gelu_tanh
    M, N = shape
    dh = strided(rand(M, N, dtype=dtype), "slice")
    a = strided(rand(M, N, dtype=dtype, scale=2.0), "transpose")
    da, h, db = gelu_bwd(dh, a)
    assert da.dtype == h.dtype == dtype and db.dtype == torch.float32 and da.is_contiguous() and h.is_contiguous()
    a64, dh64 = a.double(), dh.double()
    da64 = gelu_tanh_grad(a64) * dh64
    da_t = torch.ops.aten.gelu_backward(dh, a, approximate="tanh")
    for what, got, own, exact in (("da", da, da_t, da64), ("h", h, gelu_tanh(a), gelu_tanh(a64)),
                                  ("db", db, da_t.sum(0), da64.sum(0))):
        assert_within_torch(f"{what} ({dtype}, {shape})", got, own, exact, factor(dtype), FLOOR[dtype])


def test_gelu_bwd_extreme_pre_activations():
    """GELU' at |a| up to 1e4 (the exp in σ clamped, e·σ² formed before it meets a): finite, and the limits
    0 and 1 of the fp64 reference, which torch's own fp32 GELU' reaches too."""
    a = torch.tensor([[-1e4, -3e3, -50.0, -9.0, 0.0, 9.0, 50.0, 3e3, 1e4]], device=DEVICE)
    dh = torch.ones_like(a)
    da, h, db = gelu_bwd(dh, a)
    exact = gelu_tanh_grad(a.double())
    assert torch.isfinite(da).all() and torch.isfinite(h).all() and torch.isfinite(db).all(), da
    assert (da.double() - exact).abs().max() < 1e-6, (da, exact)


def test_gelu_bwd_rejects_bad_input():
    a = torch.randn(4, 6, device=DEVICE)
    with pytest.raises(ValueError, match=r"gelu_bwd: dh must have shape \(4, 6\)"):
        gelu_bwd(torch.randn(4, 5, device=DEVICE), a)
    with pytest.raises(ValueError, match="gelu_bwd: a must be 2-D"):
        gelu_bwd(a[None], a[None])
    with pytest.raises(ValueError, match="gelu_bwd: a has dtype torch.float32 but dh has torch.float16"):
        gelu_bwd(a.half(), a)


def test_elementwise_row_launch_shapes():
    """The CUDA launch shapes of the fused GELU pass (and SwiGLU's gate pass), worked by hand from the rule."""
    from meanflow_fast.kernels.launch import elementwise_row_launch
    assert elementwise_row_launch(32768, 3072, True) == (8, 32, 256)  # B/2 batch 128: 4096 × 12 tiles, 4 per program
    assert elementwise_row_launch(16384, 4608, True) == (8, 32, 256)  # XL/2 batch 64: 2048 × 18 tiles, 4 per program
    assert elementwise_row_launch(100, 96, True) == (16, 16, 128)     # small: one step per program
    assert elementwise_row_launch(150, 100, False) == (16, 64, 128)   # the interpreter: 64-row programs


# =================================================================================================
#                   Primal only: mlp of the plain forward
# =================================================================================================
@pytest.mark.parametrize("dtype,shape,strided", kernel_cases("mlp"))
def test_primal_kernel_matches_reference(dtype, shape, strided):
    check_primal_kernel_matches_reference("mlp", dtype, shape, strided)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_primal_launch_equals_the_primal_stream_of_the_dual_launch(dtype):
    """Without tangents the fc1 + GELU launch only drops the tangent: h and the pre-activation are
    bit-identical to those of the dual launch."""
    ml = OPS["mlp"].make(((3, 11), 40, 100), dtype, True)
    x, w1, b1 = ml.primals[:3]
    h, h_none, a = dual_linear_fwd(x, w1, b1, None, gelu=True, store_pre=True)
    h_d, _, a_d = dual_linear_fwd(x, w1, b1, ml.tangents[0], gelu=True, store_pre=True)
    assert h_none is None and torch.equal(h, h_d) and torch.equal(a, a_d)


def test_primal_saves_what_the_dual_backward_needs():
    check_primal_saves("mlp", 4)  # x, a, W1, W2


def test_mlp_partial_grads_and_no_grad():
    case = OPS["mlp"].make(((2, 5), 40, 72), torch.float32, False)
    x, w1, b1, w2, b2 = case.primals
    ref = mlp_ref(*[p.double() for p in case.primals])
    with torch.no_grad():
        assert rel_err(mlp(*case.primals), ref) < 1e-5
    w2 = w2.detach().requires_grad_()  # only W2 needs a gradient: dW2 = dyᵀ gelu(a) from the saved a
    (dw2,) = torch.autograd.grad(mlp(x, w1, b1, w2, b2).sum(), w2)
    w2_64 = w2.detach().double().requires_grad_()
    (dw2_64,) = torch.autograd.grad(mlp_ref(x.double(), w1.double(), b1.double(), w2_64, b2.double()).sum(), w2_64)
    assert rel_err(dw2, dw2_64) < 1e-5
    assert rel_err(mlp(x, w1, None, w2.detach(), None), mlp_ref(x, w1, None, w2.detach(), None)) < 1e-5


def test_no_grad_fc1_switch_is_checked(monkeypatch):
    with pytest.raises(ValueError, match=r"no_grad_fc1=...\) must be one of 'cublaslt', 'triton', got 'cublas'"):
        with config.override(no_grad_fc1="cublas"):
            pass
    monkeypatch.setenv("MEANFLOW_FAST_NO_GRAD_FC1", "cublas")
    with pytest.raises(ValueError,
                       match=r"MEANFLOW_FAST_NO_GRAD_FC1 must be one of 'cublaslt', 'triton', got 'cublas'"):
        importlib.reload(config)
    monkeypatch.setenv("MEANFLOW_FAST_NO_GRAD_FC1", "Triton")
    importlib.reload(config)
    assert config.get("no_grad_fc1") == "triton"
    monkeypatch.delenv("MEANFLOW_FAST_NO_GRAD_FC1")
    importlib.reload(config)
    assert config.get("no_grad_fc1") == "cublaslt"


@requires_cuda
@pytest.mark.parametrize("impl", ["cublaslt", "triton"])
def test_mlp_no_grad_bf16_dit_b2_on_gpu(impl, kernel_switch):
    """The no-grad MLP (the guided target's forward, the sampler) in bf16 at DiT-B/2 shapes, fc1 + GELU
    on cuBLASLt's GELU epilogue or on Triton (the config switch no_grad_fc1), against the fp32 reference within
    2× torch's own bf16 error; and the chosen implementation is the one that ran."""
    kernel_switch(no_grad_fc1=impl)
    case = dit_case("mlp")
    bf = [to(p, torch.bfloat16) for p in case.primals]
    with fp32_matmuls():
        with torch.no_grad(), OpLog() as log:
            y = mlp(*bf)
        y32, y_t = mlp_ref(*[to(p, torch.float32) for p in bf]), mlp_ref(*bf)
    assert_within_torch(f"output ({impl})", y, y_t, y32, 2, 1e-3)
    ran = {"cublaslt": "aten._addmm_activation", "triton": "meanflow_fast.linear_gelu_fwd"}
    assert ran[impl] in log.ops and all(ran[o] not in log.ops for o in ran if o != impl), log.ops


@requires_cuda
def test_primal_bf16_dit_b2_shapes_on_gpu():
    check_primal_bf16_dit_b2("mlp")


@pytest.mark.parametrize("weight_tangents", [False, True], ids=["x-tangent", "with-weight-tangents"])
def test_func_jvp_over_primal_functions(weight_tangents):
    """torch.func.jvp over ``mlp`` (the plain forward with backend="triton"): the input's tangent goes to
    the dual kernel; with tangents on the weights and biases too, its jvp takes the explicit rule in torch."""
    check_func_jvp_over_primal("mlp", weight_tangents)


# =================================================================================================
#                                    Loud validation
# =================================================================================================
def _bad_calls():
    """(id, call, message) of every bad call: ``mlp_jvp``'s, then (ids primal-…) ``mlp``'s."""
    x = f32(2, 5, 8)
    w1, b1, w2, b2 = f32(12, 8), f32(12), f32(8, 12), f32(8)
    cases = [
        ("w2", lambda: mlp_jvp(x, w1, b1, f32(8, 11), b2, x), r"w2 must have shape \(out_features, 12\)"),
        ("b1", lambda: mlp_jvp(x, w1, f32(8), w2, b2, x), r"b1 must have shape \(12,\)"),
        ("x", lambda: mlp_jvp(f32(2, 5, 7), w1, b1, w2, b2, f32(2, 5, 7)), r"x must have shape \(\.\.\., 8\)"),
        ("primal-w2", lambda: mlp(x, w1, b1, f32(8, 11), b2), r"mlp: w2 must have shape \(out_features, 12\)"),
        ("primal-b1", lambda: mlp(x, w1, f32(8), w2, b2), r"mlp: b1 must have shape \(12,\)"),
        ("primal-b2", lambda: mlp(x, w1, b1, w2, f32(7)), r"mlp: b2 must have shape \(8,\)"),
        ("primal-x", lambda: mlp(f32(2, 5, 7), w1, b1, w2, b2), r"mlp: x must have shape \(\.\.\., 8\)"),
        ("primal-w1-1d", lambda: mlp(x, w1[0], b1, w2, b2), "w1 must be 2-D"),
        ("primal-mixed", lambda: mlp(x, w1.half(), b1, w2, b2), "w1 has dtype torch.float16"),
    ]
    if not HAS_CUDA:
        cases.append(("bf16-interp", lambda: mlp_jvp(*(t.bfloat16() for t in (x, w1, b1, w2, b2, x))),
                      "bfloat16 is not supported in Triton's CPU interpreter"))
        cases.append(("primal-bf16-interp", lambda: mlp(*(t.bfloat16() for t in (x, w1, b1, w2, b2))),
                      "bfloat16 is not supported in Triton's CPU interpreter"))
    return cases


@pytest.mark.parametrize("call,match", bad_call_params("mlp", _bad_calls()))
def test_invalid_inputs_raise_value_error(call, match):
    check_raises_value_error(call, match)


# =================================================================================================
#                         Reverse mode under torch.func
# =================================================================================================
@pytest.mark.parametrize("check,name", torch_func_cases(
    grad=["mlp", "mlp_jvp"],
    grad_bf16_gpu=["mlp_jvp"],
    vjp_after=["mlp_jvp"],
    second_level=["mlp"]))
def test_reverse_mode_under_torch_func(check, name, seed):
    check(name, seed)


def test_forward_mode_tangents_are_checked():
    """torch.func.jvp over the primal-only op checks its tangents as ``mlp_jvp`` does."""
    x, w1, b1, w2, b2 = make_mlp(((2, 5), 40, 72), torch.float32, False).primals
    with pytest.raises(ValueError, match="mlp_jvp: x_dot has dtype torch.float16 but x has"):
        torch.func.jvp(lambda a: mlp(a, w1, b1, w2, b2), (x,), (x.half(),))


def test_launchers_called_alone_validate():
    x, w1, b1, w2, b2 = make_mlp(((2, 5), 40, 72), torch.float32, False).primals
    with pytest.raises(ValueError, match=r"mlp: b1 must have shape \(72,\)"):
        mlp_fwd(x, w1, b1[:5], w2, b2)
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="bfloat16 is not supported in Triton's CPU interpreter"):
            mlp_jvp_fwd(*(t.bfloat16() for t in (x, w1, b1, w2, b2, x)))
