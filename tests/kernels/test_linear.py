"""The dual linear (kernels/linear.py): ``linear_jvp`` and the dual GEMM launch ``dual_linear_fwd`` against
fp64 references, with the rule and cases of tests/kernels/cases.py; its fc1 + GELU primal op."""
import pytest
import torch

from meanflow_fast.kernels import config
from meanflow_fast.kernels.linear import dual_linear_fwd, linear_jvp, linear_jvp_ref
from tests.helpers import HAS_CUDA, rel_err, requires_cuda
from tests.kernels.cases import (assert_opcheck, bad_call_params, check_backward_saves_nothing_of_the_tangent_stream,
                                 check_bf16_dit_b2, check_jvp_ref_matches_func_jvp, check_kernel_matches_reference,
                                 check_raises_value_error, f32, kernel_cases, make_linear, torch_func_cases)


def test_jvp_ref_matches_func_jvp():
    check_jvp_ref_matches_func_jvp("linear")


@pytest.mark.parametrize("dtype,shape,strided", kernel_cases("linear"))
def test_kernel_matches_reference(dtype, shape, strided):
    check_kernel_matches_reference("linear", dtype, shape, strided)


def test_backward_saves_nothing_of_the_tangent_stream():
    check_backward_saves_nothing_of_the_tangent_stream("linear", 2)  # x and W


@pytest.mark.parametrize("impl", ["triton", "cublas", None])
def test_plain_dual_linear_impls(impl):
    """Both implementations of the epilogue-free dual launch (and the device's default) against fp64
    (torch's own matmul stands in for cuBLAS on the CPU)."""
    case = make_linear(((3, 11), 40, 72), torch.float32, True)
    x, w, b = case.primals
    y, y_dot, pre = dual_linear_fwd(x, w, b, case.tangents[0], impl=impl)
    y64, yd64 = linear_jvp_ref(x.double(), w.double(), b.double(), case.tangents[0].double())
    assert y.shape == y64.shape and y.is_contiguous() and y_dot.is_contiguous() and pre.numel() == 0
    assert rel_err(y, y64) < 1e-5 and rel_err(y_dot, yd64) < 1e-5


# =================================================================================================
#                                    Loud validation
# =================================================================================================
def _bad_calls():
    x, w, b = f32(2, 5, 8), f32(6, 8), f32(6)
    cases = [
        ("fp64", lambda: linear_jvp(x.double(), w.double(), b.double(), x.double()), "supported dtypes"),
        ("int", lambda: linear_jvp(x.long(), w.long(), None, x.long()), "supported dtypes"),
        ("mixed", lambda: linear_jvp(x, w, b, x.half()), "x_dot has dtype torch.float16"),
        ("xdot-shape", lambda: linear_jvp(x, w, b, x[:, :4]), r"x_dot must have shape \(2, 5, 8\)"),
        ("w-1d", lambda: linear_jvp(x, w[0], b, x), "weight must be 2-D"),
        ("k", lambda: linear_jvp(x, f32(6, 7), b, x), "in_features=7"),
        ("bias", lambda: linear_jvp(x, w, f32(5), x), r"bias must have shape \(6,\)"),
        ("impl", lambda: dual_linear_fwd(x, w, b, x, impl="cutlass"), r"impl must be one of \('triton'"),
        ("impl-gelu", lambda: dual_linear_fwd(x, w, b, x, gelu=True, impl="cublas"), "no GELU epilogue"),
        ("device", lambda: linear_jvp(x, w, b, torch.empty(2, 5, 8, device="meta")), "is on meta"),
    ]
    if not HAS_CUDA:
        cases.append(("bf16-interp", lambda: linear_jvp(*(t.bfloat16() for t in (x, w, b, x))),
                      "bfloat16 is not supported in Triton's CPU interpreter"))
    return cases


@pytest.mark.parametrize("call,match", bad_call_params("linear", _bad_calls()))
def test_invalid_inputs_raise_value_error(call, match):
    check_raises_value_error(call, match)


# =================================================================================================
#                         torch.library custom ops
# =================================================================================================
def test_custom_ops_pass_opcheck():
    x, xd, w, b = f32(2, 5, 40), f32(2, 5, 40), f32(72, 40), f32(72)
    ops = torch.ops.meanflow_fast
    assert_opcheck((ops.dual_linear_fwd, (x, w, b, xd, True, True)),
                   (ops.dual_linear_fwd, (x, w, None, xd, False, False)))


def test_primal_custom_ops_pass_opcheck():
    """fc1 + GELU without tangents (the MLP's primal-only launch)."""
    x, w, b = f32(2, 5, 40), f32(72, 40), f32(72)
    ops = torch.ops.meanflow_fast
    assert_opcheck((ops.linear_gelu_fwd, (x, w, b, True)), (ops.linear_gelu_fwd, (x, w, None, False)))


# =================================================================================================
#                         Reverse mode under torch.func
# =================================================================================================
@pytest.mark.parametrize("check,name", torch_func_cases(grad=["linear_jvp"], grad_bf16_gpu=["linear_jvp"]))
def test_reverse_mode_under_torch_func(check, name, seed):
    check(name, seed)


# =================================================================================================
#                         GPU: bf16 at DiT-B/2 shapes against an fp32 reference
# =================================================================================================
@requires_cuda
def test_bf16_dit_b2_shapes_on_gpu():
    check_bf16_dit_b2("linear")


@requires_cuda
def test_bf16_dual_linear_kernel_on_gpu():
    """The same check with the Triton dual GEMM in the epilogue-free launch (qkv 768→2304), which CUDA
    otherwise sends to cuBLAS (the config switch plain_dual_linear)."""
    with config.override(plain_dual_linear="triton"):
        check_bf16_dit_b2("linear")


def test_missing_tangent_is_a_value_error():
    x, w, b = make_linear(((2, 5), 40, 72), torch.float32, False).primals
    with pytest.raises(ValueError, match="linear_jvp: x_dot must be a tensor"):
        linear_jvp(x, w, b, None)
