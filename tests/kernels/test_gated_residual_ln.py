"""The fused gated residual + LayerNorm-modulate (kernels/gated_residual_ln.py), with tangents
(``gated_residual_ln_jvp``) and primal only (``gated_residual_ln``, the plain forward's): forward,
tangents and gradients against fp64, within 2× the error of torch's own computation at the same
precision (the rule of tests/kernels/cases.py, whose input helpers this file shares). Interpreter on
the CPU (fp32, fp16, bf16: no tl.dot here), the GPU in bf16 at DiT-B/2 shapes.
"""
import numpy as np
import pytest
import torch

from meanflow_fast.kernels import config
import meanflow_fast.kernels.gated_residual_ln as grl
from meanflow_fast.kernels.gated_residual_ln import (gated_residual_ln, gated_residual_ln_jvp,
                                                     gated_residual_ln_jvp_ref, gated_residual_ln_ref)
from tests.helpers import assert_within_torch, rel_err, requires_cuda
from tests.kernels.cases import (FLOOR, factor, modulation, rand, strided, torch_func_cases)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(B, N, D, dtype, is_strided):
    """(primals x, gate, f, shift, scale; tangents): the (B, D) ones are adaLN-like chunk views when
    ``is_strided``, and x, f read through a column slice / a transposed copy."""
    x, f, xd, fd = (rand(B, N, D, dtype=dtype) for _ in range(4))
    gate, shift, scale = modulation(B, D, dtype, 3, is_strided)
    gate_d, shift_d, scale_d = modulation(B, D, dtype, 3, is_strided)
    if is_strided:
        x, f, xd, fd = strided(x, "slice"), strided(f, "transpose"), strided(xd, "transpose"), strided(fd, "slice")
    return [x, gate, f, shift, scale], [xd, gate_d, fd, shift_d, scale_d]


def _cast(ts, dtype):
    return [t.detach().to(dtype) for t in ts]


def test_reference_matches_func_jvp():
    """The fp64 reference's tangents are torch.func.jvp's of the composed primal reference."""
    prim, tan = _inputs(2, 5, 40, torch.float64, False)
    (y, m), (yd, md) = torch.func.jvp(lambda *a: gated_residual_ln_ref(*a, 1e-6), tuple(prim), tuple(tan))
    out = gated_residual_ln_jvp_ref(*prim, *tan, 1e-6)
    for got, exp in zip(out, (y, yd, m, md)):
        assert rel_err(got, exp) <= 1e-12


@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", [(1, 7, 72), (3, 11, 40), (2, 3, 1030)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_tangents(dtype, shape, strided):
    prim, tan = _inputs(*shape, dtype, strided)
    exact = gated_residual_ln_jvp_ref(*_cast(prim, torch.float64), *_cast(tan, torch.float64))
    own = gated_residual_ln_jvp_ref(*prim, *tan)  # torch at this precision (y rounded before the LN)
    got = gated_residual_ln_jvp(*prim, *tan)
    for what, g, o, e in zip(("y", "y_dot", "m", "m_dot"), got, own, exact):
        assert g.dtype == dtype and g.shape == e.shape and g.is_contiguous(), what
        assert_within_torch(f"{what} ({dtype}, {shape})", g, o, e, factor(dtype), FLOOR[dtype])
    assert got[1].grad_fn is None and got[3].grad_fn is None


def _grads(fn, prim, tan, wy, wm, dtype):
    """Gradients of Σ wy ⊙ y + Σ wm ⊙ m (a weight None leaves that output out of the loss) with respect
    to the five primals, through ``fn`` at ``dtype``: a dual function (→ y, ẏ, m, ṁ) given the tangents,
    a primal one (→ y, m) with ``tan`` None."""
    leaves = [p.detach().to(dtype).requires_grad_() for p in prim]
    if tan is None:
        y, m = fn(*leaves)
    else:
        y, _, m, _ = fn(*leaves, *_cast(tan, dtype))
    loss = sum((out.double() * w.double()).sum() for out, w in ((y, wy), (m, wm)) if w is not None)
    return torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)  # unused: zeros


@pytest.mark.parametrize("uses", ["both", "m_only", "y_only"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients(dtype, uses):
    """Both outputs in the loss (the DiT: y feeds the next residual, m the attention or MLP), m alone
    (the last block: HAS_DY=False), y alone (the residual's backward alone)."""
    B, N, D = 3, 11, 40
    prim, tan = _inputs(B, N, D, dtype, True)
    wy = None if uses == "m_only" else rand(B, N, D, dtype=dtype)
    wm = None if uses == "y_only" else rand(B, N, D, dtype=dtype)
    g = _grads(gated_residual_ln_jvp, prim, tan, wy, wm, dtype)
    g64 = _grads(gated_residual_ln_jvp_ref, prim, tan, wy, wm, torch.float64)
    g_t = _grads(gated_residual_ln_jvp_ref, prim, tan, wy, wm, dtype)
    for name, a, t, e in zip(("x", "gate", "f", "shift", "scale"), g, g_t, g64):
        assert a.dtype == dtype and a.shape == e.shape, name
        if uses == "y_only" and name in ("shift", "scale"):
            assert not a.any(), name  # m took no part: no gradient (zeros from materialize_grads)
            continue
        assert_within_torch(f"grad {name} ({uses}, {dtype})", a, t, e, factor(dtype), FLOOR[dtype])


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_backward_token_loop(steps, monkeypatch):
    """Several row steps per program forced (the GPU takes more than one only past ~16 k tiles), with
    N = 37 tokens leaving a masked tail inside the loop and three batch elements' partial sums."""
    monkeypatch.setattr(grl, "steps_per_program", lambda *a, **k: steps)
    prim, tan = _inputs(3, 37, 40, torch.float32, True)
    wy, wm = rand(3, 37, 40, dtype=torch.float32), rand(3, 37, 40, dtype=torch.float32)
    g = _grads(gated_residual_ln_jvp, prim, tan, wy, wm, torch.float32)
    g64 = _grads(gated_residual_ln_jvp_ref, prim, tan, wy, wm, torch.float64)
    g32 = _grads(gated_residual_ln_jvp_ref, prim, tan, wy, wm, torch.float32)
    for i, (a, t, e) in enumerate(zip(g, g32, g64)):
        assert_within_torch(f"grad {i} (steps {steps})", a, t, e, 2, FLOOR[torch.float32])


def test_fuse_switch_gives_the_same_results(monkeypatch):
    """The switch ``residual_ln="apart"`` runs the two ops' kernels one after the other: the same outputs
    and gradients."""
    prim, tan = _inputs(2, 9, 40, torch.float32, True)
    wy, wm = rand(2, 9, 40, dtype=torch.float32), rand(2, 9, 40, dtype=torch.float32)
    fused = gated_residual_ln_jvp(*prim, *tan), _grads(gated_residual_ln_jvp, prim, tan, wy, wm, torch.float32)
    with config.override(residual_ln="apart"):
        apart = gated_residual_ln_jvp(*prim, *tan), _grads(gated_residual_ln_jvp, prim, tan, wy, wm, torch.float32)
    for a, b in zip((*fused[0], *fused[1]), (*apart[0], *apart[1])):
        assert rel_err(a, b) <= 1e-6


def test_backward_saves_nothing_of_the_tangent_stream():
    prim, tan = _inputs(2, 5, 40, torch.float32, False)
    leaves = [p.detach().requires_grad_() for p in prim]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y, y_dot, m, m_dot = gated_residual_ln_jvp(*leaves, *tan)
    tangent_ptrs = {t.untyped_storage().data_ptr() for t in (*tan, y_dot, m_dot)}
    assert len(saved) == 6  # y, f, gate, scale, μ, 1/σ: what the two ops apart keep
    assert all(t.untyped_storage().data_ptr() not in tangent_ptrs for t in saved)


def test_backward_launch_shapes():
    """Worked by hand from the rule in ``_gated_residual_ln_bwd_launch``: whole-row steps of ~2048
    elements, at least 8 tokens per program, more steps past ~16 k tiles."""
    launch = grl._gated_residual_ln_bwd_launch
    assert launch(128, 256, 1024, True) == (2, 8)    # DiT-B/2 batch 128: 4 steps of 2 rows
    assert launch(64, 256, 2048, True) == (1, 8)     # DiT-XL/2 batch 64 (D 1152): 8 steps of 1 row
    assert launch(1024, 256, 1024, True) == (2, 16)  # 131072 tiles: 8 steps per program
    assert launch(2, 7, 64, False) == (32, 32)       # the interpreter: one 32-row step


def test_bad_input_names_the_argument():
    prim, tan = _inputs(2, 5, 40, torch.float32, False)
    x, gate, f, shift, scale = prim
    with pytest.raises(ValueError, match=r"gated_residual_ln_jvp: scale must have shape \(2, 40\)"):
        gated_residual_ln_jvp(x, gate, f, shift, scale[:, :7], *tan)
    with pytest.raises(ValueError, match=r"gated_residual_ln_jvp: f must have shape \(2, 5, 40\)"):
        gated_residual_ln_jvp(x, gate, f[:, :3], shift, scale, *tan)
    with pytest.raises(ValueError, match="gated_residual_ln_jvp: eps must be a non-negative float"):
        gated_residual_ln_jvp(*prim, *tan, -1.0)


def test_custom_ops_pass_opcheck():
    prim, tan = _inputs(2, 5, 40, torch.float32, True)
    y, _, m, _, mean, rstd = grl.gated_residual_ln_fwd(*prim, *tan)
    ops = torch.ops.meanflow_fast
    x, gate, f, shift, scale = prim
    for op, args in ((ops.gated_residual_ln_fwd, (*prim, *tan, 1e-6)),
                     (ops.gated_residual_ln_bwd, (m, y, y, f, gate, scale, mean, rstd)),
                     (ops.gated_residual_ln_bwd, (m, None, y, f, gate, scale, mean, rstd))):
        result = torch.library.opcheck(op.default, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


@requires_cuda
def test_bf16_dit_b2_shapes_on_gpu():
    """bf16 at DiT-B/2 shapes (B 4, N 256, D 768) against fp32, within 2× torch's own bf16 error."""
    prim32, tan32 = _inputs(4, 256, 768, torch.float32, True)
    prim, tan = _cast(prim32, torch.bfloat16), _cast(tan32, torch.bfloat16)
    exact = gated_residual_ln_jvp_ref(*_cast(prim, torch.float32), *_cast(tan, torch.float32))
    own = gated_residual_ln_jvp_ref(*prim, *tan)
    for what, g, o, e in zip(("y", "y_dot", "m", "m_dot"), gated_residual_ln_jvp(*prim, *tan), own, exact):
        assert_within_torch(what, g, o, e, 2, 1e-3)
    wy, wm = rand(4, 256, 768, dtype=torch.bfloat16), rand(4, 256, 768, dtype=torch.bfloat16)
    g = _grads(gated_residual_ln_jvp, prim, tan, wy, wm, torch.bfloat16)
    g32 = _grads(gated_residual_ln_jvp_ref, prim, tan, wy, wm, torch.float32)
    g_t = _grads(gated_residual_ln_jvp_ref, prim, tan, wy, wm, torch.bfloat16)
    for i, (a, t, e) in enumerate(zip(g, g_t, g32)):
        assert_within_torch(f"grad {i}", a, t, e, 2, 1e-3)


# =================================================================================================
#                 Primal only (HAS_TANGENT=False): gated_residual_ln of the plain forward
# =================================================================================================
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", [(1, 7, 72), (2, 3, 1030)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_primal_forward(dtype, shape, strided):
    prim, tan = _inputs(*shape, dtype, strided)
    exact = gated_residual_ln_ref(*_cast(prim, torch.float64))
    own = gated_residual_ln_ref(*prim)
    got = gated_residual_ln(*prim)
    for what, g, o, e in zip(("y", "m"), got, own, exact):
        assert g.dtype == dtype and g.shape == e.shape and g.is_contiguous(), what
        assert_within_torch(f"{what} ({dtype}, {shape})", g, o, e, factor(dtype), FLOOR[dtype])
    # HAS_TANGENT=False only drops the tangents: y, m and the statistics equal the dual launch's, bit for bit
    primal, dual = grl.gated_residual_ln_fwd(*prim), grl.gated_residual_ln_fwd(*prim, *tan)
    assert primal[1] is None and primal[3] is None
    for i in (0, 2, 4, 5):
        assert torch.equal(primal[i], dual[i]), i


@pytest.mark.parametrize("uses", ["both", "m_only", "y_only"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_primal_gradients(dtype, uses):
    B, N, D = 3, 11, 40
    prim, _ = _inputs(B, N, D, dtype, True)
    wy = None if uses == "m_only" else rand(B, N, D, dtype=dtype)
    wm = None if uses == "y_only" else rand(B, N, D, dtype=dtype)
    g = _grads(gated_residual_ln, prim, None, wy, wm, dtype)
    g64 = _grads(gated_residual_ln_ref, prim, None, wy, wm, torch.float64)
    g_t = _grads(gated_residual_ln_ref, prim, None, wy, wm, dtype)
    for name, a, t, e in zip(("x", "gate", "f", "shift", "scale"), g, g_t, g64):
        assert a.dtype == dtype and a.shape == e.shape, name
        if uses == "y_only" and name in ("shift", "scale"):
            assert not a.any(), name
            continue
        assert_within_torch(f"grad {name} ({uses}, {dtype})", a, t, e, factor(dtype), FLOOR[dtype])


def test_primal_saves_what_the_dual_saves_and_nothing_without_grad():
    prim, _ = _inputs(2, 5, 40, torch.float32, False)
    leaves = [p.detach().requires_grad_() for p in prim]
    for grad, expected in ((True, 6), (False, 0)):  # y, f, gate, scale, μ, 1/σ
        saved = []
        with torch.set_grad_enabled(grad), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y, m = gated_residual_ln(*leaves)
        assert len(saved) == expected and y.requires_grad == grad and m.requires_grad == grad


def test_primal_fuse_switch_gives_the_same_results(monkeypatch):
    prim, _ = _inputs(2, 9, 40, torch.float32, True)
    wy, wm = rand(2, 9, 40, dtype=torch.float32), rand(2, 9, 40, dtype=torch.float32)
    fused = (*gated_residual_ln(*prim), *_grads(gated_residual_ln, prim, None, wy, wm, torch.float32))
    with config.override(residual_ln="apart"):
        apart = (*gated_residual_ln(*prim), *_grads(gated_residual_ln, prim, None, wy, wm, torch.float32))
    for a, b in zip(fused, apart):
        assert rel_err(a, b) <= 1e-6


def test_func_jvp_over_primal_runs_the_dual_kernel():
    """torch.func.jvp over ``gated_residual_ln`` (every input with a tangent, the plain forward under
    forward-mode AD) against torch.func.jvp over the fp64 reference."""
    prim, tan = _inputs(3, 11, 40, torch.float32, True)
    out, out_dot = torch.func.jvp(gated_residual_ln, tuple(prim), tuple(tan))
    ref, ref_dot = torch.func.jvp(gated_residual_ln_ref, tuple(_cast(prim, torch.float64)),
                                  tuple(_cast(tan, torch.float64)))
    for what, a, e in zip(("y", "m", "y_dot", "m_dot"), (*out, *out_dot), (*ref, *ref_dot)):
        assert rel_err(a, e) <= 1e-5, (what, rel_err(a, e))


def test_primal_custom_op_passes_opcheck_and_traces():
    prim, _ = _inputs(2, 5, 40, torch.float32, True)
    result = torch.library.opcheck(torch.ops.meanflow_fast.gated_residual_ln_primal_fwd.default, (*prim, 1e-6))
    assert all(v == "SUCCESS" for v in result.values()), result
    leaves = [p.detach().requires_grad_() for p in prim]

    def f(*a):
        y, m = gated_residual_ln(*a)
        return (y * 0.5 + m * m).sum()
    g = torch.autograd.grad(f(*leaves), leaves)
    torch._dynamo.reset()
    g_c = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves), leaves)
    for a, b in zip(g_c, g):
        assert rel_err(a, b) <= 1e-6


def test_primal_bad_input_names_the_argument():
    prim, tan = _inputs(2, 5, 40, torch.float32, False)
    x, gate, f, shift, scale = prim
    with pytest.raises(ValueError, match=r"gated_residual_ln: shift must have shape \(2, 40\)"):
        gated_residual_ln(x, gate, f, shift[:1], scale)
    with pytest.raises(ValueError, match=r"gated_residual_ln: gate must have shape \(2, 40\)"):
        gated_residual_ln(x, x, f, shift, scale)
    with pytest.raises(ValueError, match="gated_residual_ln: eps must be a non-negative float"):
        gated_residual_ln(*prim, eps=-1.0)
    with pytest.raises(ValueError, match="must be given together"):  # some tangents but not all
        grl.gated_residual_ln_fwd(*prim, tan[0], tan[1], tan[2])


@requires_cuda
def test_primal_bf16_dit_b2_shapes_on_gpu():
    prim32, _ = _inputs(4, 256, 768, torch.float32, True)
    prim = _cast(prim32, torch.bfloat16)
    exact, own = gated_residual_ln_ref(*_cast(prim, torch.float32)), gated_residual_ln_ref(*prim)
    for what, g, o, e in zip(("y", "m"), gated_residual_ln(*prim), own, exact):
        assert_within_torch(what, g, o, e, 2, 1e-3)
    wy, wm = rand(4, 256, 768, dtype=torch.bfloat16), rand(4, 256, 768, dtype=torch.bfloat16)
    g = _grads(gated_residual_ln, prim, None, wy, wm, torch.bfloat16)
    g32 = _grads(gated_residual_ln_ref, prim, None, wy, wm, torch.float32)
    g_t = _grads(gated_residual_ln_ref, prim, None, wy, wm, torch.bfloat16)
    for i, (a, t, e) in enumerate(zip(g, g_t, g32)):
        assert_within_torch(f"grad {i}", a, t, e, 2, 1e-3)


# =================================================================================================
#                         Reverse mode under torch.func
# =================================================================================================
@pytest.mark.parametrize("check,name", torch_func_cases(
    grad=["gated_residual_ln", "gated_residual_ln_jvp"],
    grad_bf16_gpu=["gated_residual_ln_jvp"],
    vjp_after=["gated_residual_ln"],
    second_level=["gated_residual_ln_jvp"]))
def test_reverse_mode_under_torch_func(check, name, seed):
    check(name, seed)


def test_forward_mode_tangents_are_checked():
    """torch.func.jvp over the primal-only op checks its tangents as ``gated_residual_ln_jvp`` does."""
    prim, _ = _inputs(2, 3, 8, torch.float32, False)
    with pytest.raises(ValueError, match="gated_residual_ln_jvp: f_dot has dtype torch.float16 but x has"):
        torch.func.jvp(lambda f: gated_residual_ln(prim[0], prim[1], f, *prim[3:]), (prim[2],), (prim[2].half(),))


def test_eps_takes_any_real_number():
    prim, _ = _inputs(2, 3, 8, torch.float32, False)
    for got, want in zip(gated_residual_ln(*prim, eps=np.float32(2**-16)), gated_residual_ln(*prim, eps=2**-16)):
        assert torch.equal(got, want)
