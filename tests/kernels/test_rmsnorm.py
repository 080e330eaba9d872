"""RMSNorm and the gated residual fused with the next RMSNorm (kernels/rmsnorm.py), with tangents
(``rms_norm_jvp``, ``gated_residual_rmsnorm_jvp``) and primal only (``rms_norm``,
``gated_residual_rmsnorm``): forward, tangents and gradients against fp64 (the references' rules and
torch.func.jvp of ``rms_norm_ref``), within 2× the error of torch's own computation at the same
precision (the rule of tests/kernels/cases.py). Interpreter on the CPU (fp32, fp16); bf16 on the GPU.
"""
import os
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import meanflow_fast.kernels.rmsnorm as rn
from meanflow_fast.kernels.rmsnorm import (channel_gated_residual_jvp_ref, channel_gated_residual_ref,
                                           gated_residual_rmsnorm, gated_residual_rmsnorm_jvp,
                                           gated_residual_rmsnorm_jvp_ref, gated_residual_rmsnorm_ref, rms_norm,
                                           rms_norm_jvp, rms_norm_jvp_ref, rms_norm_ref)
from tests.helpers import HAS_CUDA, assert_within_torch, rel_err, requires_cuda
from tests.kernels.cases import DEVICE, FLOOR, assert_jvp, check_raises_value_error, factor, r64, rand, strided

F64 = torch.float64
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
WIDTHS = [64, 96, 200, 1024]
# Leading dims: 37 and 276·2 rows (the iMF's 276 tokens), and ONE_ROW: 8 separate one-row calls. A row's
# error is set by the rounding of its single statistic r, so one row alone would measure the kernel
# against one lucky or unlucky rounding of torch's; the rule is applied to the 8 calls together.
ONE_ROW = (8, 1)
LEADS = [ONE_ROW, (37,), (2, 276)]


def _grid(full: bool = True):
    """(dtype, lead dims, D, strided) of the forward checks: every dtype × width × row count contiguous
    (``full=False``: without the costliest one in the interpreter, 552 rows of 1024), and the 37-row
    inputs read through strides too."""
    out = []
    for dtype in DTYPES:
        for D in WIDTHS:
            for lead in LEADS:
                if not full and lead == (2, 276) and D == 1024:
                    continue
                for is_strided in ((False, True) if lead == (37,) else (False,)):
                    rows_id = "1rowx8" if lead == ONE_ROW else "x".join(map(str, lead))
                    how = "strided" if is_strided else "contig"
                    out.append(pytest.param(dtype, lead, D, is_strided, id=f"{str(dtype)[6:]}-{rows_id}x{D}-{how}"))
    return out


def per_call(fn, lead):
    """fn itself, or for ONE_ROW inputs fn called on each (1, D) slice of its row inputs (the ≥ 2-D
    arguments; the (D,) parameters are passed whole) with the outputs stacked back."""
    if lead != ONE_ROW:
        return fn

    def call(*args):
        outs = [fn(*[a[i] if a.dim() >= 2 else a for a in args]) for i in range(lead[0])]
        if torch.is_tensor(outs[0]):
            return torch.stack(outs)
        return tuple(torch.stack(o) for o in zip(*outs))
    return call


def _cast(ts, dtype):
    return [None if t is None else t.detach().to(dtype) for t in ts]


def _rms_inputs(lead, D, dtype, is_strided=False):
    """(x, weight, ẋ); strided: x a column slice of a wider tensor, ẋ with leading dims that cannot be
    merged (the launcher copies), the weight every other element of a longer vector."""
    x, xd = rand(*lead, D, dtype=dtype, scale=2.0, shift=0.3), rand(*lead, D, dtype=dtype)
    w = rand(D, dtype=dtype, scale=0.5, shift=1.0)
    if is_strided:
        x, w = strided(x, "slice"), strided(w, "step")
        xd = strided(xd, "transpose") if len(lead) > 1 else strided(xd, "slice")
    return x, w, xd


def _fused_inputs(lead, D, dtype, is_strided=False):
    """(x, f, gate, weight), (ẋ, ḟ)."""
    x, f, xd, fd = (rand(*lead, D, dtype=dtype) for _ in range(4))
    gate, w = rand(D, dtype=dtype, scale=0.7), rand(D, dtype=dtype, scale=0.5, shift=1.0)
    if is_strided:
        x, fd, gate, w = strided(x, "slice"), strided(fd, "slice"), strided(gate, "step"), strided(w, "step")
        if len(lead) > 1:
            f, xd = strided(f, "transpose"), strided(xd, "transpose")
    return [x, f, gate, w], [xd, fd]


def _rms_func_jvp(x, w, xd, eps=1e-6):
    """torch.func.jvp of rms_norm_ref along ẋ (the weight a constant)."""
    return torch.func.jvp(lambda a: rms_norm_ref(a, w, eps), (x,), (xd,))


# =================================================================================================
#                                 RMSNorm: rms_norm_jvp, rms_norm
# =================================================================================================
@pytest.mark.parametrize("dtype,lead,D,strided", _grid())
def test_rms_norm_jvp_matches_reference(dtype, lead, D, strided):
    x, w, xd = _rms_inputs(lead, D, dtype, strided)
    exact = _rms_func_jvp(*_cast((x, w, xd), F64))      # torch.func.jvp of the reference, fp64
    rule = rms_norm_jvp_ref(*_cast((x, w, xd), F64))    # the explicit rule, fp64
    own = rms_norm_jvp_ref(x, w, xd)                    # torch's own error at this precision
    y, y_dot = per_call(rms_norm_jvp, lead)(x, w, xd)
    assert y_dot.grad_fn is None and not y_dot.requires_grad
    for what, got, o, e, r in zip(("y", "y_dot"), (y, y_dot), own, exact, rule):
        assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous(), what
        assert_within_torch(f"{what} vs func.jvp", got, o, e, factor(dtype), FLOOR[dtype])
        assert_within_torch(f"{what} vs rule", got, o, r, factor(dtype), FLOOR[dtype])


@pytest.mark.parametrize("dtype,lead,D,strided", _grid(full=False))
def test_rms_norm_primal_matches_reference(dtype, lead, D, strided):
    x, w, _ = _rms_inputs(lead, D, dtype, strided)
    y = per_call(rms_norm, lead)(x, w)
    assert y.dtype == dtype and y.shape == x.shape
    assert_within_torch("y", y, rms_norm_ref(x, w), rms_norm_ref(*_cast((x, w), F64)), factor(dtype), FLOOR[dtype])


@pytest.mark.parametrize("lead,D", [((37,), 96), ((2, 9), 200)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_primal_launch_equals_the_dual_launch(dtype, lead, D):
    """HAS_TANGENT=False only drops the tangent: y and r equal the dual launch's, bit for bit."""
    x, w, xd = _rms_inputs(lead, D, dtype, True)
    primal, dual = rn.rms_norm_fwd(x, w), rn.rms_norm_fwd(x, w, xd)
    assert primal[1] is None and torch.equal(primal[0], dual[0]) and torch.equal(primal[2], dual[2])


# eps = 0: the interpreter warns about 1/√0 in the padding rows of a tile (masked, never stored)
PADDING_WARNINGS = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning",
                                              "ignore:invalid value:RuntimeWarning")


@PADDING_WARNINGS
def test_rms_norm_statistic_is_worked_by_hand():
    """A row of (3, 4) with w = (1, 2), eps = 0: mean(x²) = 12.5, so y = (3, 8)/√12.5, and r saved."""
    x, w = torch.tensor([[3.0, 4.0]], device=DEVICE), torch.tensor([1.0, 2.0], device=DEVICE)
    y, _, rstd = rn.rms_norm_fwd(x, w, eps=0.0)
    assert torch.allclose(y, torch.tensor([[3.0, 8.0]], device=DEVICE) / 12.5 ** 0.5, rtol=1e-6)
    assert torch.allclose(rstd, torch.tensor([12.5 ** -0.5], device=DEVICE), rtol=1e-6)


def test_rms_norm_per_head_layout():
    """QK-norm's layout (B, N, H, D_h) as given and as a transposed (B, H, N, D_h) view (its leading dims
    cannot be merged: the launcher copies)."""
    q, w, qd = _rms_inputs((2, 9, 3), 64, torch.float32)
    for x, xd in ((q, qd), (q.transpose(1, 2), qd.transpose(1, 2))):
        y, y_dot = rms_norm_jvp(x, w, xd)
        e, e_dot = _rms_func_jvp(*_cast((x, w, xd), F64))
        assert y.shape == x.shape and rel_err(y, e) <= 1e-6 and rel_err(y_dot, e_dot) <= 1e-6


def _grads(fn, inputs, cots, dtype):
    """Gradients of Σ_k out_k ⊙ cot_k over fn's differentiable outputs (a cot None leaves that output out)
    with respect to every input, at ``dtype``; unused inputs get zeros."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    outs = fn(*leaves)
    loss = sum((o.double() * c.double()).sum() for o, c in zip(outs, cots) if c is not None)
    return torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)


GRAD_SHAPES = [(ONE_ROW, 64), ((37,), 96), ((2, 276), 200), ((3,), 1024)]


@pytest.mark.parametrize("via", ["primal", "jvp"])
@pytest.mark.parametrize("lead,D", GRAD_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_gradients(dtype, lead, D, via):
    """dx and dweight through the Triton backward (of ``rms_norm`` or ``rms_norm_jvp``) against autograd
    through the fp64 reference."""
    x, w, xd = _rms_inputs(lead, D, dtype, lead == (37,))
    cot = [rand(*lead, D, dtype=dtype)]
    fn = (lambda a, b: [rms_norm(a, b)]) if via == "primal" else (lambda a, b, t: [rms_norm_jvp(a, b, t)[0]])
    got = _grads(lambda a, b: per_call(fn, lead)(a, b, *([] if via == "primal" else [xd])), (x, w), cot, dtype)
    exact = _grads(lambda a, b: [rms_norm_ref(a, b)], (x, w), cot, F64)
    # torch's own error, its calls made as the kernel's (ONE_ROW: 8 weight gradients rounded, then added)
    own = _grads(per_call(lambda a, b: [rms_norm_ref(a, b)], lead), (x, w), cot, dtype)
    for name, g, o, e in zip(("x", "weight"), got, own, exact):
        assert g.dtype == dtype and g.shape == e.shape, name
        assert_within_torch(f"grad {name}", g, o, e, factor(dtype), FLOOR[dtype])


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_backward_row_loop(steps, monkeypatch):
    """Several row steps per program forced (the GPU takes more than one only past ~16 k tiles), with 37
    rows leaving a masked tail inside the loop; both ops' backwards."""
    monkeypatch.setattr(rn, "steps_per_program", lambda *a, **k: steps)
    x, w, _ = _rms_inputs((37,), 200, torch.float32, True)
    cot = [rand(37, 200, dtype=torch.float32)]
    got = _grads(lambda a, b: [rms_norm(a, b)], (x, w), cot, torch.float32)
    exact = _grads(lambda a, b: [rms_norm_ref(a, b)], (x, w), cot, F64)
    own = _grads(lambda a, b: [rms_norm_ref(a, b)], (x, w), cot, torch.float32)
    prim, _ = _fused_inputs((37,), 200, torch.float32, True)
    cots = [rand(37, 200, dtype=torch.float32) for _ in range(2)]
    got += _grads(gated_residual_rmsnorm, prim, cots, torch.float32)
    exact += _grads(gated_residual_rmsnorm_ref, prim, cots, F64)
    own += _grads(gated_residual_rmsnorm_ref, prim, cots, torch.float32)
    for i, (g, o, e) in enumerate(zip(got, own, exact)):
        assert_within_torch(f"grad {i} (steps {steps})", g, o, e, 2, FLOOR[torch.float32])


def test_backward_launch_shapes():
    """Worked by hand from the rule in ``_bwd_launch``: iMF-B/2 at batch 128 (35328 rows of 768, tiles of
    2 rows), at least 8 rows per program, more steps past ~16 k tiles; the interpreter's single step."""
    launch = rn._bwd_launch
    assert launch(35328, 1024, True, False) == (4, 8)       # 8832 steps of 4 rows: 2 per program
    assert launch(35328, 1024, True, True) == (2, 8)        # the fused backward: the forward's tile
    assert launch(1 << 20, 1024, True, False) == (4, 32)    # 262144 tiles: 8 steps per program
    assert launch(37, 256, False, False) == (8, 8)          # the interpreter: one 8-row step


def test_empty_rows():
    x, w = torch.zeros(0, 64, device=DEVICE, requires_grad=True), torch.ones(64, device=DEVICE, requires_grad=True)
    y = rms_norm(x, w)
    dx, dw = torch.autograd.grad(y.sum(), (x, w))
    assert y.shape == (0, 64) and dx.shape == (0, 64) and torch.equal(dw, torch.zeros(64, device=DEVICE))


def test_rms_norm_saves_nothing_of_the_tangent_stream():
    x, w, xd = _rms_inputs((3, 5), 40, torch.float32)
    leaves = [x.requires_grad_(), w.requires_grad_()]
    for call, grad, expected in ((lambda: rms_norm_jvp(*leaves, xd), True, 3), (lambda: rms_norm(*leaves), True, 3),
                                 (lambda: rms_norm(*leaves), False, 0)):
        saved = []
        with torch.set_grad_enabled(grad), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = call()
        assert len(saved) == expected  # x, weight, r
        ptrs = {xd.untyped_storage().data_ptr()}
        if isinstance(out, tuple):
            ptrs.add(out[1].untyped_storage().data_ptr())
        assert all(t.untyped_storage().data_ptr() not in ptrs for t in saved)


@PADDING_WARNINGS
def test_rms_norm_eps_is_used():
    x, w, xd = _rms_inputs((5,), 72, torch.float32)
    x = x * 1e-2  # mean(x²) ~ 4e-4: eps = 1e-2 matters
    for eps in (1e-2, 0.0):
        y, y_dot = rms_norm_jvp(x, w, xd, eps=eps)
        e, e_dot = _rms_func_jvp(*_cast((x, w, xd), F64), eps=eps)
        assert rel_err(y, e) <= 1e-6 and rel_err(y_dot, e_dot) <= 1e-6
    assert rel_err(rms_norm(x, w, eps=1e-2), rms_norm_ref(x.double(), w.double())) > 1e-2


@pytest.mark.parametrize("eps", [np.float32(2**-16), torch.tensor(2**-16), 2**-16], ids=["numpy", "tensor", "float"])
def test_eps_takes_any_real_number(eps):
    x, w, xd = _rms_inputs((3,), 8, torch.float32)
    prim, tan = _fused_inputs((3,), 8, torch.float32)
    assert torch.equal(rms_norm(x, w, eps=eps), rms_norm(x, w, eps=2**-16))
    assert torch.equal(rms_norm_jvp(x, w, xd, eps=eps)[1], rms_norm_jvp(x, w, xd, eps=2**-16)[1])
    for a, b in zip(gated_residual_rmsnorm_jvp(*prim, *tan, eps=eps), gated_residual_rmsnorm_jvp(*prim, *tan, 2**-16)):
        assert torch.equal(a, b)


# =================================================================================================
#                   Gated residual + RMSNorm: gated_residual_rmsnorm(_jvp)
# =================================================================================================
def _fused_func_jvp(prim, tan):
    """torch.func.jvp of the composed primal reference along (ẋ, ḟ) (gate and weight constants)."""
    x, f, gate, w = prim
    (h, m), (hd, md) = torch.func.jvp(lambda a, b: gated_residual_rmsnorm_ref(a, b, gate, w), (x, f), tuple(tan))
    return h, hd, m, md


@pytest.mark.parametrize("dtype,lead,D,strided", _grid())
def test_fused_jvp_matches_reference(dtype, lead, D, strided):
    prim, tan = _fused_inputs(lead, D, dtype, strided)
    exact = _fused_func_jvp(_cast(prim, F64), _cast(tan, F64))
    rule = gated_residual_rmsnorm_jvp_ref(*_cast(prim, F64), *_cast(tan, F64))
    own = gated_residual_rmsnorm_jvp_ref(*prim, *tan)
    got = per_call(gated_residual_rmsnorm_jvp, lead)(*prim, *tan)
    assert got[1].grad_fn is None and got[3].grad_fn is None
    for what, g, o, e, r in zip(("h", "h_dot", "m", "m_dot"), got, own, exact, rule):
        assert g.dtype == dtype and g.shape == prim[0].shape and g.is_contiguous(), what
        assert_within_torch(f"{what} vs func.jvp", g, o, e, factor(dtype), FLOOR[dtype])
        assert_within_torch(f"{what} vs rule", g, o, r, factor(dtype), FLOOR[dtype])


@pytest.mark.parametrize("lead,D", [((37,), 96), ((2, 276), 64)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_equals_the_two_ops_apart(dtype, lead, D):
    """h rounded before the norm reads it: m and ṁ equal ``rms_norm_jvp`` run on the fused op's h and ḣ,
    bit for bit, and the primal-only launch gives the dual launch's h, m and r."""
    prim, tan = _fused_inputs(lead, D, dtype, True)
    h, h_dot, m, m_dot = gated_residual_rmsnorm_jvp(*prim, *tan)
    m2, m2_dot = rms_norm_jvp(h, prim[3], h_dot)
    assert torch.equal(m, m2) and torch.equal(m_dot, m2_dot)
    x, f, gate, _ = prim
    assert_within_torch("h", h, channel_gated_residual_ref(x, gate, f),
                        channel_gated_residual_ref(*_cast((x, gate, f), F64)), factor(dtype), FLOOR[dtype])
    primal, dual = rn.gated_residual_rmsnorm_fwd(*prim), rn.gated_residual_rmsnorm_fwd(*prim, *tan)
    assert primal[1] is None and primal[3] is None
    for i in (0, 2, 4):
        assert torch.equal(primal[i], dual[i]), i
    hp, mp = gated_residual_rmsnorm(*prim)
    assert torch.equal(hp, h) and torch.equal(mp, m)


@pytest.mark.parametrize("lead,D,via,uses", [
    pytest.param(lead, D, via, uses, id=f"{'x'.join(map(str, lead))}x{D}-{via}-{uses}")
    for lead, D, uses_list in (((37,), 200, ("both", "m_only", "h_only")), ((2, 276), 96, ("both",)))
    for via in ("primal", "jvp") for uses in uses_list])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_gradients(dtype, lead, D, via, uses):
    """Both outputs in the loss (the block: h feeds the next residual, m the next sub-block), m alone (the
    last norm: HAS_DH=False), h alone (HAS_DM=False: no weight gradient)."""
    prim, tan = _fused_inputs(lead, D, dtype, True)
    cots = [None if uses == "m_only" else rand(*lead, D, dtype=dtype),
            None if uses == "h_only" else rand(*lead, D, dtype=dtype)]
    fn = gated_residual_rmsnorm if via == "primal" else (lambda *a: gated_residual_rmsnorm_jvp(*a, *tan)[::2])
    got = _grads(fn, prim, cots, dtype)
    exact = _grads(gated_residual_rmsnorm_ref, prim, cots, F64)
    own = _grads(gated_residual_rmsnorm_ref, prim, cots, dtype)
    for name, g, o, e in zip(("x", "f", "gate", "weight"), got, own, exact):
        assert g.dtype == dtype and g.shape == e.shape, name
        if uses == "h_only" and name == "weight":
            assert not g.any()  # m took no part: no gradient (zeros from materialize_grads)
            continue
        assert_within_torch(f"grad {name} ({via}, {uses})", g, o, e, factor(dtype), FLOOR[dtype])


def test_fused_saves_nothing_of_the_tangent_stream():
    prim, tan = _fused_inputs((2, 5), 40, torch.float32)
    leaves = [p.requires_grad_() for p in prim]
    for call, grad, expected in ((lambda: gated_residual_rmsnorm_jvp(*leaves, *tan), True, 5),
                                 (lambda: gated_residual_rmsnorm(*leaves), True, 5),
                                 (lambda: gated_residual_rmsnorm(*leaves), False, 0)):
        saved = []
        with torch.set_grad_enabled(grad), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = call()
        assert len(saved) == expected  # h, f, gate, weight, r
        ptrs = {t.untyped_storage().data_ptr() for t in tan}
        if len(out) == 4:
            ptrs |= {out[1].untyped_storage().data_ptr(), out[3].untyped_storage().data_ptr()}
        assert all(t.untyped_storage().data_ptr() not in ptrs for t in saved)


# =================================================================================================
#                 Forward-mode AD over the primal functions (the dual kernels), compile, opcheck
# =================================================================================================
@pytest.mark.parametrize("params", [False, True], ids=["inputs", "inputs+params"])
def test_func_jvp_over_primal_functions(params):
    """torch.func.jvp over ``rms_norm`` and ``gated_residual_rmsnorm`` against torch.func.jvp over the
    fp64 references; with ``params`` the weight and the gate get tangents too (the explicit rule)."""
    x, w, xd = _rms_inputs((3, 11), 40, torch.float32, True)
    wd = rand(40, dtype=torch.float32)
    prim_r, tan_r = ([x, w], [xd, wd]) if params else ([x], [xd])
    fused, (fxd, ffd) = _fused_inputs((3, 11), 40, torch.float32, True)
    fused_tan = [fxd, ffd] + ([rand(40, dtype=torch.float32) for _ in range(2)] if params else [])

    def call(fn, prim, tan, rest, dtype):
        rest = _cast(rest, dtype)
        return torch.func.jvp(lambda *a: fn(*a, *rest), tuple(_cast(prim, dtype)), tuple(_cast(tan, dtype)))

    for fn, ref, prim, tan, rest in (
            (rms_norm, rms_norm_ref, prim_r, tan_r, [] if params else [w]),
            (gated_residual_rmsnorm, gated_residual_rmsnorm_ref, fused[:len(fused_tan)], fused_tan,
             fused[len(fused_tan):])):
        got = call(fn, prim, tan, rest, torch.float32)
        exp = call(ref, prim, tan, rest, F64)
        flat_got = [got[0]] if torch.is_tensor(got[0]) else list(got[0])
        flat_exp = [exp[0]] if torch.is_tensor(exp[0]) else list(exp[0])
        flat_got += [got[1]] if torch.is_tensor(got[1]) else list(got[1])
        flat_exp += [exp[1]] if torch.is_tensor(exp[1]) else list(exp[1])
        for i, (a, e) in enumerate(zip(flat_got, flat_exp)):
            assert rel_err(a, e) <= 1e-5, (fn.__name__, i, rel_err(a, e))


def test_forward_mode_tangents_are_checked():
    x, w, _ = _rms_inputs((2, 3), 8, torch.float32)
    with pytest.raises(ValueError, match="rms_norm_jvp: x_dot has dtype torch.float16 but x has"):
        torch.func.jvp(lambda a: rms_norm(a, w), (x,), (x.half(),))
    prim, _ = _fused_inputs((2, 3), 8, torch.float32)
    with pytest.raises(ValueError, match="gated_residual_rmsnorm_jvp: gate_dot has dtype torch.float16"):
        torch.func.jvp(lambda g: gated_residual_rmsnorm(prim[0], prim[1], g, prim[3]), (prim[2],), (prim[2].half(),))


def test_custom_ops_pass_opcheck():
    x, w, xd = _rms_inputs((2, 5), 40, torch.float32)
    prim, tan = _fused_inputs((2, 5), 40, torch.float32)
    _, _, rstd = rn.rms_norm_fwd(x, w)
    h, _, _, _, hr = rn.gated_residual_rmsnorm_fwd(*prim)
    ops = torch.ops.meanflow_fast
    for op, args in ((ops.rms_norm_fwd, (x, w, xd, 1e-6)), (ops.rms_norm_primal_fwd, (x, w, 1e-6)),
                     (ops.rms_norm_bwd, (xd, x, w, rstd)),
                     (ops.gated_residual_rmsnorm_fwd, (*prim, *tan, 1e-6)),
                     (ops.gated_residual_rmsnorm_primal_fwd, (*prim, 1e-6)),
                     (ops.gated_residual_rmsnorm_bwd, (h, prim[1], prim[2], prim[3], hr, tan[0], tan[1])),
                     (ops.gated_residual_rmsnorm_bwd, (h, prim[1], prim[2], prim[3], hr, None, tan[1])),
                     (ops.gated_residual_rmsnorm_bwd, (h, prim[1], prim[2], prim[3], hr, tan[0], None))):
        result = torch.library.opcheck(op.default, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_compiles_with_gradients():
    """A block-like chain under torch.compile (fullgraph, aot_eager): the custom ops trace, and the
    gradients equal eager autograd through the same kernels."""
    prim, _ = _fused_inputs((2, 5), 40, torch.float32)
    w2 = rand(40, dtype=torch.float32).requires_grad_()
    leaves = [p.requires_grad_() for p in prim]

    def f(x, f_, gate, w):
        h, m = gated_residual_rmsnorm(x, f_, gate, w)
        return (h * 0.5 + rms_norm(m, w2) ** 2).sum()
    g = torch.autograd.grad(f(*leaves), leaves + [w2])
    torch._dynamo.reset()
    g_c = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves), leaves + [w2])
    for a, b in zip(g_c, g):
        assert rel_err(a, b) <= 1e-6


# =================================================================================================
#                         Reverse mode under torch.func (launch.backward_once)
# =================================================================================================
OUTPUTS = {"gated_residual_rmsnorm": (0, 1), "gated_residual_rmsnorm_jvp": (0, 2)}


def _func_case(name, dtype, seed):
    """(kernel fn, reference fn, inputs) of one public function; both fns return the list of their
    differentiable outputs, the tangents are fixed constants. The same values at every dtype."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, dtype=F64, device=DEVICE, generator=gen).to(dtype)
    x, f, xd, fd, g, w = r(2, 7, 40), r(2, 7, 40), r(2, 7, 40), r(2, 7, 40), r(40), r(40) + 1
    pick = OUTPUTS.get(name, (0,))

    def outs(fn):
        def call(*a):
            res = fn(*a)
            return [res] if torch.is_tensor(res) else [res[i] for i in pick]
        return call
    return {
        "rms_norm": (outs(rms_norm), outs(rms_norm_ref), [x, w]),
        "rms_norm_jvp": (outs(lambda a, b: rms_norm_jvp(a, b, xd)), outs(lambda a, b: rms_norm_jvp_ref(a, b, xd)),
                         [x, w]),
        "gated_residual_rmsnorm": (outs(gated_residual_rmsnorm), outs(gated_residual_rmsnorm_ref), [x, f, g, w]),
        "gated_residual_rmsnorm_jvp": (outs(lambda *a: gated_residual_rmsnorm_jvp(*a, xd, fd)),
                                       outs(lambda *a: gated_residual_rmsnorm_jvp_ref(*a, xd, fd)), [x, f, g, w]),
    }[name]


NAMES = ["rms_norm", "rms_norm_jvp", "gated_residual_rmsnorm", "gated_residual_rmsnorm_jvp"]


def _loss(fn, cots):
    return lambda *a: sum((o * c).sum() for o, c in zip(fn(*a), cots))


@pytest.mark.parametrize("name", NAMES)
def test_func_grad_equals_autograd_and_fp64(name, seed):
    fn, _, inputs = _func_case(name, torch.float32, seed)
    _, ref, inputs64 = _func_case(name, F64, seed)
    cots = [torch.randn_like(o) for o in ref(*inputs64)]
    loss = _loss(fn, [c.float() for c in cots])
    got = torch.func.grad(loss, argnums=tuple(range(len(inputs))))(*inputs)
    leaves = [t.clone().requires_grad_() for t in inputs]
    plain = torch.autograd.grad(loss(*leaves), leaves)
    leaves64 = [t.clone().requires_grad_() for t in inputs64]
    exact = torch.autograd.grad(_loss(ref, cots)(*leaves64), leaves64)
    for i, (a, p, e) in enumerate(zip(got, plain, exact)):
        assert torch.equal(a, p), f"{name}: input {i}: torch.func.grad differs from autograd"
        assert rel_err(a, e) <= 1e-5, f"{name}: input {i}: rel err {rel_err(a, e):.3g}"


@pytest.mark.parametrize("name", ["rms_norm", "gated_residual_rmsnorm"])
def test_func_vjp_called_after_the_transform(name, seed):
    fn, _, inputs = _func_case(name, torch.float32, seed)
    _, ref, inputs64 = _func_case(name, F64, seed)
    outs, vjp_fn = torch.func.vjp(fn, *inputs)
    cots = [torch.randn_like(o) for o in outs]
    got = vjp_fn(cots)
    leaves = [t.clone().requires_grad_() for t in inputs64]
    exact = torch.autograd.grad(ref(*leaves), leaves, [c.double() for c in cots])
    for i, (a, e) in enumerate(zip(got, exact)):
        assert rel_err(a, e) <= 1e-5, f"{name}: input {i}: rel err {rel_err(a, e):.3g}"


@pytest.mark.parametrize("name", ["rms_norm_jvp", "gated_residual_rmsnorm_jvp"])
def test_second_transform_level_refuses(name, seed):
    """A grad of a grad, a jvp of a grad, a vjp_fn inside a grad would differentiate the kernels'
    backward: NotImplementedError (or torch's own refusal), never a silent zero."""
    fn, _, (x, *rest) = _func_case(name, torch.float32, seed)

    def first(x_):
        return _loss(fn, [torch.ones_like(o) for o in fn(x_, *rest)])(x_, *rest)

    def vjp_inside(x_):
        outs, vjp_fn = torch.func.vjp(lambda a: fn(a, *rest), x_)
        return vjp_fn([torch.ones_like(o) for o in outs])[0].square().sum()

    for second in (lambda: torch.func.grad(lambda x_: torch.func.grad(first)(x_).square().sum())(x),
                   lambda: torch.func.jvp(torch.func.grad(first), (x,), (torch.randn_like(x),)),
                   lambda: torch.func.grad(vjp_inside)(x)):
        with pytest.raises((NotImplementedError, RuntimeError), match="not differentiable|implement the jvp"):
            second()


# =================================================================================================
#                                    Loud validation
# =================================================================================================
def _bad_calls():
    x, w = rand(2, 5, 8, dtype=torch.float32), rand(8, dtype=torch.float32)
    f = rand(2, 5, 8, dtype=torch.float32)
    calls = [
        ("weight-shape", lambda: rms_norm(x, rand(9, dtype=torch.float32)), r"rms_norm: weight must have shape \(8,\)"),
        ("weight-2d", lambda: rms_norm(x, w[None]), r"rms_norm: weight must have shape \(8,\)"),
        ("x-0d", lambda: rms_norm(x[0, 0, 0], w), "rms_norm: x must have at least 1 dim"),
        ("d0", lambda: rms_norm(x[..., :0], w[:0]), "D = 0"),
        ("eps", lambda: rms_norm(x, w, eps=-1.0), "rms_norm: eps must be a non-negative float"),
        ("eps-str", lambda: rms_norm(x, w, eps="small"), "eps must be a non-negative float"),
        ("eps-bool", lambda: rms_norm_jvp(x, w, x, eps=True), "eps must be a non-negative float"),
        ("dtype", lambda: rms_norm(x, w.half()), "weight has dtype torch.float16"),
        ("fp64", lambda: rms_norm(x.double(), w.double()), "supported dtypes"),
        ("not-tensor", lambda: rms_norm(x, [1.0] * 8), "weight must be a torch.Tensor"),
        ("x-dot-shape", lambda: rms_norm_jvp(x, w, x[:, :3]), r"rms_norm_jvp: x_dot must have shape \(2, 5, 8\)"),
        ("x-dot-dtype", lambda: rms_norm_jvp(x, w, x.half()), "rms_norm_jvp: x_dot has dtype torch.float16"),
        ("fused-f", lambda: gated_residual_rmsnorm(x, f[:, :3], w, w),
         r"gated_residual_rmsnorm: f must have shape \(2, 5, 8\)"),
        ("fused-gate", lambda: gated_residual_rmsnorm(x, f, x[:, 0], w),
         r"gated_residual_rmsnorm: gate must have shape \(8,\)"),
        ("fused-weight", lambda: gated_residual_rmsnorm(x, f, w, w[:7]),
         r"gated_residual_rmsnorm: weight must have shape \(8,\)"),
        ("fused-eps", lambda: gated_residual_rmsnorm(x, f, w, w, eps=-1e-6), "eps must be a non-negative float"),
        ("fused-jvp-fdot", lambda: gated_residual_rmsnorm_jvp(x, f, w, w, x, f[0]),
         r"gated_residual_rmsnorm_jvp: f_dot must have shape \(2, 5, 8\)"),
        ("fused-jvp-dtype", lambda: gated_residual_rmsnorm_jvp(x, f, w, w, x.half(), f),
         "x_dot has dtype torch.float16"),
        ("fused-partial-tangent", lambda: rn.gated_residual_rmsnorm_fwd(x, f, w, w, x, None),
         "must be given together"),
    ]
    if not HAS_CUDA:
        def without_interpreter(fn, *args):
            def call():
                with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}):
                    fn(*args)
            return call
        calls += [("no-interpreter", without_interpreter(rms_norm, x, w), "TRITON_INTERPRET=1"),
                  ("jvp-no-interpreter", without_interpreter(rms_norm_jvp, x, w, x), "TRITON_INTERPRET=1"),
                  ("fused-no-interpreter", without_interpreter(gated_residual_rmsnorm_jvp, x, f, w, w, x, f),
                   "TRITON_INTERPRET=1")]
    return [pytest.param(call, match, id=i) for i, call, match in calls]


@pytest.mark.parametrize("call,match", _bad_calls())
def test_invalid_inputs_raise_value_error(call, match):
    check_raises_value_error(call, match)


# =================================================================================================
#                              GPU: bf16 at iMF-B/2 shapes
# =================================================================================================
@requires_cuda
def test_bf16_imf_b2_shapes_on_gpu():
    """bf16 at iMF-B/2 shapes (B 4, N 276, D 768) against fp32, within 2× torch's own bf16 error: outputs,
    tangents and gradients of both ops."""
    bf = torch.bfloat16
    x, w, xd = _cast(_rms_inputs((4, 276), 768, torch.float32), bf)
    exact, own = rms_norm_jvp_ref(*_cast((x, w, xd), torch.float32)), rms_norm_jvp_ref(x, w, xd)
    for what, g, o, e in zip(("y", "y_dot"), rms_norm_jvp(x, w, xd), own, exact):
        assert_within_torch(what, g, o, e, 2, 1e-3)
    cot = [rand(4, 276, 768, dtype=bf)]
    for via in (lambda a, b: [rms_norm(a, b)], lambda a, b: [rms_norm_jvp(a, b, xd)[0]]):
        got = _grads(via, (x, w), cot, bf)
        e32 = _grads(lambda a, b: [rms_norm_ref(a, b)], (x, w), cot, torch.float32)
        o16 = _grads(lambda a, b: [rms_norm_ref(a, b)], (x, w), cot, bf)
        for i, (g, o, e) in enumerate(zip(got, o16, e32)):
            assert_within_torch(f"grad {i}", g, o, e, 2, 1e-3)

    prim32, tan32 = _fused_inputs((4, 276), 768, torch.float32, True)
    prim, tan = _cast(prim32, bf), _cast(tan32, bf)
    exact = gated_residual_rmsnorm_jvp_ref(*_cast(prim, torch.float32), *_cast(tan, torch.float32))
    own = gated_residual_rmsnorm_jvp_ref(*prim, *tan)
    for what, g, o, e in zip(("h", "h_dot", "m", "m_dot"), gated_residual_rmsnorm_jvp(*prim, *tan), own, exact):
        assert_within_torch(what, g, o, e, 2, 1e-3)
    cots = [rand(4, 276, 768, dtype=bf) for _ in range(2)]
    for fn in (gated_residual_rmsnorm, lambda *a: gated_residual_rmsnorm_jvp(*a, *tan)[::2]):
        got = _grads(fn, prim, cots, bf)
        e32 = _grads(gated_residual_rmsnorm_ref, prim, cots, torch.float32)
        o16 = _grads(gated_residual_rmsnorm_ref, prim, cots, bf)
        for i, (g, o, e) in enumerate(zip(got, o16, e32)):
            assert_within_torch(f"fused grad {i}", g, o, e, 2, 1e-3)


# ---------------------------------------------------------------------------------------------------- references
# The pure-torch references themselves: each primal against an independent computation (torch's own op or the
# formula written out), each explicit tangent rule against torch.func.jvp of its primal, in fp64 at odd shapes;
# tangents carry no graph, primals stay differentiable.
@pytest.mark.parametrize("shape", [(2, 7, 40), (3, 5, 2, 6), (1, 1, 9)])
def test_rms_norm_primal_matches_torch(shape):
    x, w = r64(*shape), r64(shape[-1])
    assert rel_err(rms_norm_ref(x, w, 1e-6), F.rms_norm(x, (shape[-1],), w, 1e-6)) <= 1e-14


@pytest.mark.parametrize("shape", [(2, 7, 40), (3, 5, 2, 6), (1, 1, 9)])
def test_rms_norm_jvp_matches_func_jvp(shape):
    x, w, x_dot = r64(*shape), r64(shape[-1]), r64(*shape)
    ref = torch.func.jvp(lambda x_: rms_norm_ref(x_, w, 1e-6), (x,), (x_dot,))
    assert_jvp(rms_norm_jvp_ref(x, w, x_dot, 1e-6), ref)


def test_rms_norm_eps_matters_for_small_rows():
    """eps enters as mean(x²) + eps: rows of size ~1e-3 see it."""
    x, w = 1e-3 * r64(2, 16), torch.ones(16, dtype=F64)
    expect = x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6)
    assert rel_err(rms_norm_ref(x, w, 1e-6), expect) <= 1e-14
    assert rel_err(rms_norm_ref(x, w, 1e-6), rms_norm_ref(x, w, 0.0)) > 1e-2


def test_rms_norm_half_computes_in_fp32():
    x, w = torch.randn(3, 50, dtype=torch.bfloat16), torch.randn(50, dtype=torch.bfloat16)
    y = rms_norm_ref(x, w)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, rms_norm_ref(x.float(), w.float()).to(torch.bfloat16))




def test_channel_gated_residual_primal_and_jvp():
    x, f, g, xd, fd = r64(2, 7, 40), r64(2, 7, 40), r64(40), r64(2, 7, 40), r64(2, 7, 40)
    assert torch.equal(channel_gated_residual_ref(x, g, f), x + g[None, None, :] * f)
    ref = torch.func.jvp(lambda x_, f_: channel_gated_residual_ref(x_, g, f_), (x, f), (xd, fd))
    assert_jvp(channel_gated_residual_jvp_ref(x, g, f, xd, fd), ref)
