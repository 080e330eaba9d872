"""LayerNorm-modulate (kernels/layernorm_modulate.py): ``ln_modulate_jvp`` with tangents and ``ln_modulate``
of the plain forward, against fp64 references with the rule and cases of tests/kernels/cases.py."""
import numpy as np
import pytest
import torch

import meanflow_fast.kernels.layernorm_modulate as ln_mod
from meanflow_fast.kernels.layernorm_modulate import (ln_modulate, ln_modulate_fwd, ln_modulate_jvp,
                                                      ln_modulate_jvp_ref, ln_modulate_ref)
from tests.helpers import rel_err, requires_cuda
from tests.kernels.cases import (OPS, assert_opcheck, bad_call_params,
                                 check_backward_saves_nothing_of_the_tangent_stream, check_backward_token_loop,
                                 check_bf16_dit_b2, check_func_jvp_over_primal, check_jvp_ref_matches_func_jvp,
                                 check_kernel_matches_reference, check_primal_bf16_dit_b2,
                                 check_primal_kernel_matches_reference, check_primal_saves, check_raises_value_error,
                                 f32, kernel_cases, make_ln, torch_func_cases)


# =================================================================================================
#                              With tangents: ln_modulate_jvp
# =================================================================================================
def test_jvp_ref_matches_func_jvp():
    check_jvp_ref_matches_func_jvp("ln_modulate")


@pytest.mark.parametrize("dtype,shape,strided", kernel_cases("ln_modulate"))
def test_kernel_matches_reference(dtype, shape, strided):
    check_kernel_matches_reference("ln_modulate", dtype, shape, strided)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_backward_token_loop(steps, monkeypatch):
    """The row-reducing backward walks ``steps`` tiles of a batch element's tokens per program (the GPU
    picks more than one only past ~16 k tiles, which no test reaches): forced here."""
    monkeypatch.setattr(ln_mod, "steps_per_program", lambda *a, **k: steps)
    check_backward_token_loop("ln_modulate")


def test_backward_launch_shapes():
    """The CUDA launch shapes of the row backward, worked by hand from the rule in its launcher."""
    from meanflow_fast.kernels.layernorm_modulate import _ln_modulate_bwd_launch
    assert _ln_modulate_bwd_launch(128, 256, 1024, True) == (4, 8)     # DiT-B/2 batch 128: 8192 tiles, 2 per program
    assert _ln_modulate_bwd_launch(64, 256, 2048, True) == (2, 8)      # DiT-XL/2 batch 64 (D 1152): 4 tiles of 2 rows
    assert _ln_modulate_bwd_launch(1024, 256, 1024, True) == (4, 16)   # 65536 tiles: 4 per program
    assert _ln_modulate_bwd_launch(2, 7, 64, False) == (32, 32)        # the interpreter: one 32-row tile


def test_backward_saves_nothing_of_the_tangent_stream():
    check_backward_saves_nothing_of_the_tangent_stream("ln_modulate", 4)  # x, scale, mean, rstd


def test_ln_modulate_eps_and_partial_grads():
    case = make_ln((2, 33, 72), torch.float32, True)
    x, shift, scale = case.primals
    x = x.detach().requires_grad_()
    m, m_dot = ln_modulate_jvp(x, shift, scale, *case.tangents, eps=1e-2)
    m_ref, md_ref = ln_modulate_jvp_ref(x.double(), shift.double(), scale.double(),
                                        *[t.double() for t in case.tangents], eps=1e-2)
    assert rel_err(m, m_ref) < 1e-5 and rel_err(m_dot, md_ref) < 1e-5
    (dx,) = torch.autograd.grad(m.sum(), x)  # only x needs a gradient (shift/scale are constants)
    x64 = x.detach().double().requires_grad_()
    (dx64,) = torch.autograd.grad(ln_modulate_ref(x64, shift.double(), scale.double(), 1e-2).sum(), x64)
    assert rel_err(dx, dx64) < 1e-5


def test_custom_ops_pass_opcheck():
    x, xd = f32(2, 5, 40), f32(2, 5, 40)
    sh, sc = f32(2, 6 * 40).chunk(6, 1)[:2]
    _, _, mean, rstd = ln_modulate_fwd(x, sh, sc, xd, sh, sc, 1e-6)
    ops = torch.ops.meanflow_fast
    assert_opcheck((ops.ln_modulate_fwd, (x, sh, sc, xd, sh, sc, 1e-6)),
                   (ops.ln_modulate_bwd, (xd, x, sc, mean, rstd)))


@requires_cuda
def test_bf16_dit_b2_shapes_on_gpu():
    check_bf16_dit_b2("ln_modulate")


# =================================================================================================
#                   Primal only (HAS_TANGENT=False): ln_modulate of the plain forward
# =================================================================================================
@pytest.mark.parametrize("dtype,shape,strided", kernel_cases("ln_modulate"))
def test_primal_kernel_matches_reference(dtype, shape, strided):
    check_primal_kernel_matches_reference("ln_modulate", dtype, shape, strided)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_primal_launch_equals_the_primal_stream_of_the_dual_launch(dtype):
    """HAS_TANGENT=False only drops the tangent: the output and the saved statistics are bit-identical
    to those of the dual launch."""
    ln = OPS["ln_modulate"].make((3, 11, 40), dtype, True)
    m, m_none, mean, rstd = ln_modulate_fwd(*ln.primals)
    m_d, _, mean_d, rstd_d = ln_modulate_fwd(*ln.primals, *ln.tangents)
    assert m_none is None
    assert torch.equal(m, m_d) and torch.equal(mean, mean_d) and torch.equal(rstd, rstd_d)


def test_primal_saves_what_the_dual_backward_needs():
    check_primal_saves("ln_modulate", 4)  # x, scale, mean, rstd


def test_ln_modulate_eps():
    case = OPS["ln_modulate"].make((2, 33, 72), torch.float32, True)
    x, shift, scale = case.primals
    m = ln_modulate(x, shift, scale, eps=1e-2)
    assert rel_err(m, ln_modulate_ref(x.double(), shift.double(), scale.double(), eps=1e-2)) < 1e-5
    assert rel_err(m, ln_modulate_ref(x.double(), shift.double(), scale.double())) > 1e-4  # eps is used


def test_primal_custom_ops_pass_opcheck():
    sh, sc = f32(2, 6 * 40).chunk(6, 1)[:2]
    assert_opcheck((torch.ops.meanflow_fast.ln_modulate_primal_fwd, (f32(2, 5, 40), sh, sc, 1e-6)))


@requires_cuda
def test_primal_bf16_dit_b2_shapes_on_gpu():
    check_primal_bf16_dit_b2("ln_modulate")


def test_func_jvp_over_primal_functions():
    """torch.func.jvp over ``ln_modulate`` (the plain forward with backend="triton"): x, shift and scale
    tangents go to the dual kernel."""
    check_func_jvp_over_primal("ln_modulate")


# =================================================================================================
#                                    Loud validation
# =================================================================================================
def _bad_calls():
    """(id, call, message) of every bad call: ``ln_modulate_jvp``'s, then (ids primal-…) ``ln_modulate``'s."""
    x, s = f32(2, 5, 8), f32(2, 8)
    cases = [
        ("2d", lambda: ln_modulate_jvp(x[0], s, s, x[0], s, s), "x must be 3-D"),
        ("shift", lambda: ln_modulate_jvp(x, f32(2, 9), s, x, s, s), r"shift must have shape \(2, 8\)"),
        ("scale-dot", lambda: ln_modulate_jvp(x, s, s, x, s, f32(3, 8)), r"scale_dot must have shape \(2, 8\)"),
        ("eps", lambda: ln_modulate_jvp(x, s, s, x, s, s, eps=-1.0), "eps must be a non-negative float"),
        ("dtype", lambda: ln_modulate_jvp(x, s.half(), s, x, s, s), "shift has dtype torch.float16"),
        ("primal-2d", lambda: ln_modulate(x[0], s, s), r"ln_modulate: x must be 3-D"),
        ("primal-shift", lambda: ln_modulate(x, f32(2, 9), s), r"ln_modulate: shift must have shape \(2, 8\)"),
        ("primal-scale", lambda: ln_modulate(x, s, f32(3, 8)), r"ln_modulate: scale must have shape \(2, 8\)"),
        ("primal-eps", lambda: ln_modulate(x, s, s, eps=-1.0), "eps must be a non-negative float"),
        ("primal-dtype", lambda: ln_modulate(x, s.half(), s), "shift has dtype torch.float16"),
        ("primal-fp64", lambda: ln_modulate(x.double(), s.double(), s.double()), "supported dtypes"),
        ("primal-d0", lambda: ln_modulate(f32(2, 5, 0), f32(2, 0), f32(2, 0)), "D = 0"),
        ("primal-partial-tangent", lambda: ln_modulate_jvp(x, s, s, x, None, s), "must be given together"),
    ]
    return cases


@pytest.mark.parametrize("call,match", bad_call_params("ln_modulate", _bad_calls()))
def test_invalid_inputs_raise_value_error(call, match):
    check_raises_value_error(call, match)


# =================================================================================================
#                         Reverse mode under torch.func
# =================================================================================================
@pytest.mark.parametrize("check,name", torch_func_cases(
    grad=["ln_modulate", "ln_modulate_jvp"],
    grad_bf16_gpu=["ln_modulate"]))
def test_reverse_mode_under_torch_func(check, name, seed):
    check(name, seed)


def test_forward_mode_tangents_are_checked():
    """torch.func.jvp over the primal-only op checks its tangents as ``ln_modulate_jvp`` does."""
    x, s = f32(2, 3, 8), f32(2, 8)
    with pytest.raises(ValueError, match="ln_modulate_jvp: shift_dot has dtype torch.float16 but x has"):
        torch.func.jvp(lambda sh: ln_modulate(x, sh, s), (s,), (s.half(),))


@pytest.mark.parametrize("eps", [np.float32(2**-16), torch.tensor(2**-16), 2**-16], ids=["numpy", "tensor", "float"])
def test_eps_takes_any_real_number(eps):
    """eps may be any real number float() takes (a NumPy scalar, a 0-d tensor); 2⁻¹⁶ is exact in each."""
    x, s = f32(2, 3, 8), f32(2, 8)
    assert torch.equal(ln_modulate(x, s, s, eps=eps), ln_modulate(x, s, s, eps=2**-16))
    assert torch.equal(ln_modulate_jvp(x, s, s, x, s, s, eps=eps)[1], ln_modulate_jvp(x, s, s, x, s, s, eps=2**-16)[1])
