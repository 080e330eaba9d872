"""The gated residual x + g ⊙ f (kernels/gated_residual.py): ``gated_residual_jvp`` with tangents and
``gated_residual`` of the plain forward, against fp64 references with the rule and cases of
tests/kernels/cases.py."""
import pytest
import torch

import meanflow_fast.kernels.gated_residual as gated_mod
from meanflow_fast.kernels.gated_residual import gated_residual, gated_residual_fwd, gated_residual_jvp
from tests.helpers import requires_cuda
from tests.kernels.cases import (OPS, assert_opcheck, bad_call_params,
                                 check_backward_saves_nothing_of_the_tangent_stream, check_backward_token_loop,
                                 check_bf16_dit_b2, check_func_jvp_over_primal, check_jvp_ref_matches_func_jvp,
                                 check_kernel_matches_reference, check_primal_bf16_dit_b2,
                                 check_primal_kernel_matches_reference, check_primal_saves, check_raises_value_error,
                                 f32, kernel_cases, torch_func_cases)


# =================================================================================================
#                              With tangents: gated_residual_jvp
# =================================================================================================
def test_jvp_ref_matches_func_jvp():
    check_jvp_ref_matches_func_jvp("gated_residual")


@pytest.mark.parametrize("dtype,shape,strided", kernel_cases("gated_residual"))
def test_kernel_matches_reference(dtype, shape, strided):
    check_kernel_matches_reference("gated_residual", dtype, shape, strided)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_backward_token_loop(steps, monkeypatch):
    """The gate's gradient sums over tokens: ``steps`` tiles of a batch element's tokens per program,
    forced here (the GPU picks more than one only past ~16 k tiles, which no test reaches)."""
    monkeypatch.setattr(gated_mod, "steps_per_program", lambda *a, **k: steps)
    check_backward_token_loop("gated_residual")


def test_backward_saves_nothing_of_the_tangent_stream():
    check_backward_saves_nothing_of_the_tangent_stream("gated_residual", 2)  # gate, f


def test_custom_ops_pass_opcheck():
    x, xd = f32(2, 5, 40), f32(2, 5, 40)
    sh, sc = f32(2, 6 * 40).chunk(6, 1)[:2]
    ops = torch.ops.meanflow_fast
    assert_opcheck((ops.gated_residual_fwd, (x, sc, xd, xd, sh, x)), (ops.gated_residual_bwd, (xd, sc, x)))


@requires_cuda
def test_bf16_dit_b2_shapes_on_gpu():
    check_bf16_dit_b2("gated_residual")


# =================================================================================================
#                   Primal only (HAS_TANGENT=False): gated_residual of the plain forward
# =================================================================================================
@pytest.mark.parametrize("dtype,shape,strided", kernel_cases("gated_residual"))
def test_primal_kernel_matches_reference(dtype, shape, strided):
    check_primal_kernel_matches_reference("gated_residual", dtype, shape, strided)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_primal_launch_equals_the_primal_stream_of_the_dual_launch(dtype):
    """HAS_TANGENT=False only drops the tangent: the output is bit-identical to the dual launch's."""
    gr = OPS["gated_residual"].make((3, 11, 40), dtype, True)
    y, y_none = gated_residual_fwd(*gr.primals)
    assert y_none is None and torch.equal(y, gated_residual_fwd(*gr.primals, *gr.tangents)[0])


def test_primal_saves_what_the_dual_backward_needs():
    check_primal_saves("gated_residual", 2)  # gate, f


def test_primal_custom_ops_pass_opcheck():
    g = f32(2, 6 * 40).chunk(6, 1)[2]
    assert_opcheck((torch.ops.meanflow_fast.gated_residual_primal_fwd, (f32(2, 5, 40), g, f32(2, 5, 40))))


@requires_cuda
def test_primal_bf16_dit_b2_shapes_on_gpu():
    check_primal_bf16_dit_b2("gated_residual")


def test_func_jvp_over_primal_functions():
    """torch.func.jvp over ``gated_residual`` (the plain forward with backend="triton"): x, gate and f
    tangents go to the dual kernel."""
    check_func_jvp_over_primal("gated_residual")


# =================================================================================================
#                                    Loud validation
# =================================================================================================
def _bad_calls():
    """(id, call, message) of every bad call: ``gated_residual_jvp``'s, then (ids primal-…)
    ``gated_residual``'s."""
    x, s = f32(2, 5, 8), f32(2, 8)
    cases = [
        ("gate", lambda: gated_residual_jvp(x, x, x, x, s, x), r"gate must have shape \(2, 8\)"),
        ("f", lambda: gated_residual_jvp(x, s, x[:, :3], x, s, x), r"f must have shape \(2, 5, 8\)"),
        ("fp64", lambda: gated_residual_jvp(*(t.double() for t in (x, s, x, x, s, x))), "supported dtypes"),
        ("primal-gate", lambda: gated_residual(x, x, x), r"gated_residual: gate must have shape \(2, 8\)"),
        ("primal-f", lambda: gated_residual(x, s, x[:, :3]), r"gated_residual: f must have shape \(2, 5, 8\)"),
        ("primal-int", lambda: gated_residual(x.long(), s.long(), x.long()), "supported dtypes"),
        ("primal-device", lambda: gated_residual(x, s, torch.empty(2, 5, 8, device="meta")), "is on meta"),
        ("primal-partial-tangent", lambda: gated_residual_jvp(x, s, x, None, s, x), "must be given together"),
    ]
    return cases


@pytest.mark.parametrize("call,match", bad_call_params("gated_residual", _bad_calls()))
def test_invalid_inputs_raise_value_error(call, match):
    check_raises_value_error(call, match)


# =================================================================================================
#                         Reverse mode under torch.func
# =================================================================================================
@pytest.mark.parametrize("check,name", torch_func_cases(grad=["gated_residual", "gated_residual_jvp"]))
def test_reverse_mode_under_torch_func(check, name, seed):
    check(name, seed)


def test_forward_mode_tangents_are_checked():
    """torch.func.jvp over the primal-only op checks its tangents as ``gated_residual_jvp`` does."""
    x, g, f = f32(2, 3, 8), f32(2, 8), f32(2, 3, 8)
    with pytest.raises(ValueError, match="gated_residual_jvp: x_dot has dtype torch.float16 but x has"):
        torch.func.jvp(lambda a: gated_residual(a, g, f), (x,), (x.half(),))
