"""The SwiGLU MLP of the iMF block (kernels/swiglu.py): ``swiglu_jvp`` (gate kernel on both streams, then the
dual W2), ``swiglu`` (primal only, forward mode through the dual kernels), the gate launcher and the backward's
fused SiLU-gate pass ``swiglu_bwd``, against torch.func.jvp and autograd of ``swiglu_ref`` in fp64 (the pass
alone: against its formula in fp64) with the 2× rule of tests/kernels/cases.py."""
import os
from unittest import mock

import pytest
import torch

from meanflow_fast.kernels.swiglu import (swiglu, swiglu_bwd, swiglu_fwd, swiglu_gate_fwd, swiglu_jvp, swiglu_jvp_fwd,
                                          swiglu_jvp_ref, swiglu_ref)
from tests.helpers import HAS_CUDA, assert_within_torch, rel_err, requires_cuda
from tests.kernels.cases import (DEVICE, FLOOR, assert_grads_within_torch, assert_jvp, assert_opcheck,
                                check_raises_value_error, f32, factor, fp32_matmuls, r64, rand, strided, to)

# (leading dims, D, hidden): 1, 37 and 100 rows (none a multiple of the interpreter's 32-row tile), D 64 and
# 96 (96 = three K steps of 32), hidden int(8/3·D) = 170 (a masked last column block) and 256.
SHAPES = [((1,), 64, 170), ((37,), 96, 256), ((4, 25), 64, 170)]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])  # no bf16 dots in the interpreter


def make_case(shape, dtype, is_strided):
    """(x, w1, w3, w2, ẋ) in ``dtype``; strided: x a column slice (read in place), ẋ with leading dims that
    cannot be merged (copied; for 2-D a column-major view, read in place), w1 column-major, w3 and w2 column slices."""
    lead, d, h = shape
    x, xd = rand(*lead, d, dtype=dtype), rand(*lead, d, dtype=dtype)
    w1, w3 = rand(h, d, dtype=dtype, scale=2 * d ** -0.5), rand(h, d, dtype=dtype, scale=d ** -0.5)
    w2 = rand(d, h, dtype=dtype, scale=h ** -0.5)
    if is_strided:
        x, xd = strided(x, "slice"), strided(xd, "transpose")
        w1, w3, w2 = strided(w1, "transpose"), strided(w3, "slice"), strided(w2, "slice")
    return x, w1, w3, w2, xd


def func_jvp_ref(x, w1, w3, w2, xd, dtype):
    """torch.func.jvp of swiglu_ref in ``dtype`` along ẋ (the weights constant)."""
    w = [to(t, dtype) for t in (w1, w3, w2)]
    return torch.func.jvp(lambda a: swiglu_ref(a, *w), (to(x, dtype),), (to(xd, dtype),))


@pytest.fixture
def bwd_launches(monkeypatch):
    """The shapes of the ``swiglu_bwd`` launches (the backward's Triton pass) made while a test runs; the
    custom op's eager wrapper and its implementation both call the launcher through the module."""
    import meanflow_fast.kernels.swiglu as mod
    launches = []
    real = mod.swiglu_bwd

    def spy(dg, a, b, check=True):
        launches.append(tuple(a.shape))
        return real(dg, a, b, check)
    monkeypatch.setattr(mod, "swiglu_bwd", spy)
    return launches


def kernel_params():
    return [pytest.param(dtype, shape, s, id=f"{str(dtype)[6:]}-{shape}-{'strided' if s else 'contig'}")
            for dtype in DTYPES for shape in SHAPES for s in (False, True)]


# =================================================================================================
#                              With tangents: swiglu_jvp
# =================================================================================================
@pytest.mark.parametrize("dtype,shape,is_strided", kernel_params())
def test_kernel_matches_reference(dtype, shape, is_strided, bwd_launches):
    """y and ẏ against torch.func.jvp of swiglu_ref in fp64, within 2× the error of swiglu_jvp_ref at the
    same precision (+ FLOOR); gradients of a random loss on y against autograd of swiglu_ref in fp64, through
    one launch of the backward's Triton pass."""
    x, w1, w3, w2, xd = make_case(shape, dtype, is_strided)
    y64, yd64 = func_jvp_ref(x, w1, w3, w2, xd, torch.float64)
    y_t, yd_t = swiglu_jvp_ref(x, w1, w3, w2, xd)
    y, y_dot = swiglu_jvp(x, w1, w3, w2, xd)
    assert y.dtype == y_dot.dtype == dtype and y.shape == y_dot.shape == y64.shape
    assert not y_dot.requires_grad and y_dot.grad_fn is None
    for what, got, own, exact in (("primal", y, y_t, y64), ("tangent", y_dot, yd_t, yd64)):
        assert_within_torch(what, got, own, exact, factor(dtype), FLOOR[dtype])
    weight = torch.randn(y64.shape, dtype=torch.float64, device=DEVICE).to(dtype)
    assert_grads_within_torch(lambda ins: swiglu_jvp(*ins, xd)[0], swiglu_ref, [x, w1, w3, w2], weight)
    assert bwd_launches == [(y64[..., 0].numel(), shape[2])]


def test_backward_saves_nothing_of_the_tangent_stream():
    """The dual Function saves x, a, b, W1, W3, W2 for backward, none of them of the tangent stream."""
    x, w1, w3, w2, xd = make_case(SHAPES[0], torch.float32, False)
    params = [t.detach().requires_grad_() for t in (x, w1, w3, w2)]
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, y_dot = swiglu_jvp(*params, xd)
    tangent_ptrs = {xd.untyped_storage().data_ptr(), y_dot.untyped_storage().data_ptr()}
    assert len(saved) == 6 and all(t.untyped_storage().data_ptr() not in tangent_ptrs for t in saved)


def test_jvp_without_grad_skips_a_and_b():
    x, w1, w3, w2, xd = make_case(SHAPES[1], torch.float32, False)
    with torch.no_grad():
        y, y_dot, a, b = swiglu_jvp_fwd(x, w1, w3, w2, xd)
        y2, y_dot2 = swiglu_jvp(x, w1, w3, w2, xd)
    assert a.numel() == 0 and b.numel() == 0 and torch.equal(y, y2) and torch.equal(y_dot, y_dot2)
    y64, yd64 = func_jvp_ref(x, w1, w3, w2, xd, torch.float64)
    assert rel_err(y, y64) < 1e-5 and rel_err(y_dot, yd64) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gate_launch(dtype):
    """The gate kernel alone: g = silu(a) ⊙ b, ġ and the stored a, b against fp64 (a, b: 2× torch's own
    rounding of x W1ᵀ, x W3ᵀ); the primal-only launch gives the dual launch's g, a, b bit for bit."""
    x, w1, w3, _, xd = make_case(((3, 11), 96, 170), dtype, True)
    g, g_dot, a, b = swiglu_gate_fwd(x, w1, w3, xd, store_ab=True)
    g_p, none, a_p, b_p = swiglu_gate_fwd(x, w1, w3, None, store_ab=True)
    assert none is None and torch.equal(g, g_p) and torch.equal(a, a_p) and torch.equal(b, b_p)
    assert all(t.is_contiguous() and t.dtype == dtype and t.shape == (3, 11, 170) for t in (g, g_dot, a, b))
    x64, xd64, w1_64, w3_64 = (t.double() for t in (x, xd, w1, w3))
    a64, b64, ad64, bd64 = x64 @ w1_64.T, x64 @ w3_64.T, xd64 @ w1_64.T, xd64 @ w3_64.T
    s = torch.sigmoid(a64)
    g64 = a64 * s * b64
    gd64 = s * (1 + a64 * (1 - s)) * ad64 * b64 + a64 * s * bd64  # silu' by hand, not through autograd
    a_t, b_t = x @ w1.T, x @ w3.T
    for what, got, own, exact in (("a", a, a_t, a64), ("b", b, b_t, b64),
                                  ("g", g, torch.nn.functional.silu(a_t) * b_t, g64)):
        assert_within_torch(what, got, own, exact, factor(dtype), FLOOR[dtype])
    _, gd_t = torch.func.jvp(lambda x_: torch.nn.functional.silu(x_ @ w1.T) * (x_ @ w3.T), (x,), (xd,))
    assert_within_torch("g_dot", g_dot, gd_t, gd64, factor(dtype), FLOOR[dtype])


def test_gate_epilogue_at_extreme_pre_activations():
    """silu and silu' at |a| up to 1e4 (σ and 1 − σ from exp(−|a|)): finite, and equal to fp64. W1 = W3 =
    the identity, so a = b = x, and ẋ = 1: g = silu(a)·a, ġ = silu'(a)·a + silu(a)."""
    vals = torch.tensor([-1e4, -3e3, -100.0, -9.0, -1e-3, 0.0, 1e-3, 9.0, 100.0, 3e3, 1e4], device=DEVICE)
    x = torch.zeros(2, 16, device=DEVICE)
    x[0, : vals.numel()] = vals
    eye = torch.eye(16, device=DEVICE)
    g, g_dot, _, _ = swiglu_gate_fwd(x, eye, eye, torch.ones_like(x))
    a = x.double()
    s = torch.sigmoid(a)
    assert torch.isfinite(g).all() and torch.isfinite(g_dot).all(), (g, g_dot)
    assert rel_err(g, a * s * a) < 1e-6 and rel_err(g_dot, s * (1 + a * (1 - s)) * a + a * s) < 1e-6


def test_custom_ops_opcheck():
    """torch.library.opcheck of the two gate ops (schema, fake shapes, AOT dispatch), with and without a, b,
    and of the backward's pass (strided inputs)."""
    from meanflow_fast.kernels.swiglu import swiglu_gate_fwd_op, swiglu_gate_primal_fwd_op
    x, w1, w3, _, xd = make_case(((2, 5), 64, 170), torch.float32, True)
    dg, a, b = strided(f32(7, 106), "slice"), strided(f32(7, 106), "transpose"), f32(7, 106)
    assert_opcheck(*[(op, args) for store in (False, True)
                     for op, args in ((torch.ops.meanflow_fast.swiglu_gate_fwd, (x, w1, w3, xd, store)),
                                      (torch.ops.meanflow_fast.swiglu_gate_primal_fwd, (x, w1, w3, store)))],
                   (torch.ops.meanflow_fast.swiglu_bwd, (dg, a, b)))
    g, g_dot, a, b = swiglu_gate_fwd_op(x, w1, w3, xd, True)  # the eager wrapper
    assert torch.equal(g, swiglu_gate_primal_fwd_op(x, w1, w3, False)[0]) and g_dot.shape == a.shape == b.shape


def test_compile_aot_eager_fullgraph():
    """Both public functions trace under torch.compile (the gate ops opaque, the Functions' twins without
    jvp) without graph breaks; outputs and gradients equal eager."""
    x, w1, w3, w2, xd = make_case(((2, 5), 64, 170), torch.float32, False)

    def f(*a):
        return (swiglu(*a) * xd).sum()

    def f_jvp(*a):
        y, y_dot = swiglu_jvp(*a, xd)
        return (y * xd).sum() + y_dot.square().sum().detach()

    torch._dynamo.reset()
    for fn in (f, f_jvp):
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        leaves_e = [t.clone().requires_grad_() for t in (x, w1, w3, w2)]
        leaves_c = [t.clone().requires_grad_() for t in (x, w1, w3, w2)]
        y_e, y_c = fn(*leaves_e), compiled(*leaves_c)
        torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad(y_c, leaves_c), torch.autograd.grad(y_e, leaves_e)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@requires_cuda
def test_bf16_imf_b2_shapes_on_gpu():
    """bf16 at the iMF-B/2 block's shapes (B 4 × 260 tokens, D 768, hidden 2048): y, ẏ and the gradients
    within 2× the error of torch's own bf16 computation, against an fp32 reference."""
    x, w1, w3, w2, xd = (to(t, torch.bfloat16) for t in make_case(((4, 260), 768, 2048), torch.float32, False))
    with fp32_matmuls():
        y32, yd32 = func_jvp_ref(x, w1, w3, w2, xd, torch.float32)
        y_t, yd_t = swiglu_jvp_ref(x, w1, w3, w2, xd)
        y, y_dot = swiglu_jvp(x, w1, w3, w2, xd)
        for what, got, own, exact in (("primal", y, y_t, y32), ("tangent", y_dot, yd_t, yd32)):
            assert_within_torch(what, got, own, exact, 2, 1e-3)
        assert_within_torch("primal-only", swiglu(x, w1, w3, w2), y_t, y32, 2, 1e-3)
        weight = torch.randn(y32.shape, device=DEVICE).to(torch.bfloat16)
        assert_grads_within_torch(lambda ins: swiglu_jvp(*ins, xd)[0], swiglu_ref, [x, w1, w3, w2], weight,
                                  torch.float32, (2, 1e-3))


# =================================================================================================
#                              Primal only: swiglu
# =================================================================================================
@pytest.mark.parametrize("dtype,shape,is_strided", kernel_params())
def test_primal_matches_reference(dtype, shape, is_strided, bwd_launches):
    x, w1, w3, w2, _ = make_case(shape, dtype, is_strided)
    y64 = swiglu_ref(*(to(t, torch.float64) for t in (x, w1, w3, w2)))
    y = swiglu(x, w1, w3, w2)
    assert y.dtype == dtype and y.shape == y64.shape
    assert_within_torch("output", y, swiglu_ref(x, w1, w3, w2), y64, factor(dtype), FLOOR[dtype])
    weight = torch.randn(y64.shape, dtype=torch.float64, device=DEVICE).to(dtype)
    assert_grads_within_torch(lambda ins: swiglu(*ins), swiglu_ref, [x, w1, w3, w2], weight)
    assert bwd_launches == [(y64[..., 0].numel(), shape[2])]


def test_primal_saves_what_the_dual_backward_needs():
    """x, a, b, W1, W3, W2 with grad; nothing (and no a, b written) without."""
    params = [t.detach().requires_grad_() for t in make_case(SHAPES[0], torch.float32, False)[:4]]
    for grad, count in ((True, 6), (False, 0)):
        saved = []

        def pack(t):
            saved.append(t)
            return t
        with torch.set_grad_enabled(grad), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = swiglu(*params)
        assert len(saved) == count and y.requires_grad == grad
    with torch.no_grad():
        _, a, b = swiglu_fwd(*params)
    assert a.numel() == 0 and b.numel() == 0


@pytest.mark.parametrize("public", ["swiglu", "swiglu_jvp"])
def test_a_and_b_are_written_only_when_a_backward_follows(public, monkeypatch):
    """The gate launch stores a and b (2 × (M, hidden) activations) only under grad mode with an input that
    requires grad: not under no_grad, not for inputs without grad."""
    import meanflow_fast.kernels.swiglu as mod
    launches = []
    real = mod.swiglu_gate_fwd

    def spy(*args, **kwargs):
        launches.append(args[4] if len(args) > 4 else kwargs.get("store_ab", False))
        return real(*args, **kwargs)
    monkeypatch.setattr(mod, "swiglu_gate_fwd", spy)
    x, w1, w3, w2, xd = make_case(SHAPES[0], torch.float32, False)
    fn = swiglu if public == "swiglu" else (lambda *a: swiglu_jvp(*a, xd)[0])
    fn(x, w1, w3, w2)  # no input requires grad
    w2.requires_grad_()
    with torch.no_grad():
        fn(x, w1, w3, w2)
    fn(x, w1, w3, w2).sum().backward()
    assert launches == [False, False, True]


def test_cuda_config_pruning():
    """The CUDA autotuner's pruning, worked by hand from its two limits (fp32 accumulator values per thread
    ≤ 128: 4 accumulators with the tangent, 2 without; stages × (x, ẋ, W1ᵀ, W3ᵀ tiles) ≤ 160 KiB)."""
    from meanflow_fast.kernels.swiglu import _CUDA_CONFIGS, _prune_configs

    def kept(dtype, has_tangent):
        args = {"X": torch.empty(0, dtype=dtype, device="meta")}
        return [_CUDA_CONFIGS.index(c) for c in _prune_configs(_CUDA_CONFIGS, args, HAS_TANGENT=has_tangent)]
    # fp16 dual: 128×128/8 warps and 64×128/4 warps hold 256 accumulator values a thread.
    assert kept(torch.float16, True) == [2, 3, 4, 5]
    # fp16 primal: all fit (64×128×64 at 4 stages: 4 · (64·64 + 2·64·128) · 2 B = 160 KiB exactly).
    assert kept(torch.float16, False) == [0, 1, 2, 3, 4, 5]
    # fp32 dual: 64×64×64 at 3 stages is 3 · 4 · 64·64 · 4 B = 192 KiB; only BLOCK_K 32 fits.
    assert kept(torch.float32, True) == [5]
    assert kept(torch.float32, False) == [4, 5]


def test_partial_grads(bwd_launches):
    """Only W2 needs a gradient (dW2 = dyᵀ g, g recomputed in torch: no Triton pass); then only x
    (dx = da W1 + db W3) and only W3 (dW3 = dbᵀ x), each through one Triton pass."""
    x, w1, w3, w2, xd = make_case(((2, 5), 64, 170), torch.float32, False)
    weight = torch.randn(2, 5, 64, dtype=torch.float64, device=DEVICE)
    for i in (3, 0, 2):
        args = [t.detach() for t in (x, w1, w3, w2)]
        args64 = [t.double() for t in args]
        args[i].requires_grad_()
        args64[i].requires_grad_()
        for fn in (swiglu, lambda *a: swiglu_jvp(*a, xd)[0]):
            bwd_launches.clear()
            (got,) = torch.autograd.grad((fn(*args) * weight.float()).sum(), args[i])
            (exact,) = torch.autograd.grad((swiglu_ref(*args64) * weight).sum(), args64[i])
            assert rel_err(got, exact) < 1e-5, (i, rel_err(got, exact))
            assert bwd_launches == ([] if i == 3 else [(10, 170)]), (i, bwd_launches)


@pytest.mark.parametrize("weight_tangents", [False, True], ids=["x-tangent", "with-weight-tangents"])
def test_func_jvp_over_primal_function(weight_tangents):
    """torch.func.jvp over ``swiglu`` against torch.func.jvp over swiglu_ref in fp64: with a tangent on x
    alone it runs the dual kernels (ẏ bit-identical to swiglu_jvp's); with tangents on the weights too its
    jvp takes the explicit rule in torch."""
    x, w1, w3, w2, xd = make_case(((3, 11), 64, 170), torch.float32, True)
    prim = [x, w1, w3, w2]
    tans = [xd] + ([torch.randn_like(w) for w in (w1, w3, w2)] if weight_tangents else [])
    n = len(tans)

    def call(fn, dtype):
        p = [to(t, dtype) for t in prim]
        return torch.func.jvp(lambda *a: fn(*a, *p[n:]), tuple(p[:n]), tuple(to(t, dtype) for t in tans))

    y, y_dot = call(swiglu, torch.float32)
    y64, yd64 = call(swiglu_ref, torch.float64)
    assert rel_err(y, y64) <= 1e-5 and rel_err(y_dot, yd64) <= 1e-5, (rel_err(y, y64), rel_err(y_dot, yd64))
    if not weight_tangents:
        assert torch.equal(y_dot, swiglu_jvp(x, w1, w3, w2, xd)[1])


def test_forward_mode_tangents_are_checked():
    x, w1, w3, w2, _ = make_case(SHAPES[0], torch.float32, False)
    with pytest.raises(ValueError, match="swiglu_jvp: x_dot has dtype torch.float16 but x has"):
        torch.func.jvp(lambda a: swiglu(a, w1, w3, w2), (x,), (x.half(),))


# =================================================================================================
#                     The backward's fused SiLU-gate pass: swiglu_bwd
# =================================================================================================
def _swiglu_bwd_exact(dg, a, b):
    """(da, db, g) in fp64 from the formula: σ = 1/(1 + e^(−a)), silu = a·σ, silu' = σ·(1 + a·(1 − σ))."""
    dg, a, b = dg.double(), a.double(), b.double()
    s = 1 / (1 + torch.exp(-a))
    return dg * b * s * (1 + a * (1 - s)), dg * a * s, a * s * b


def _check_swiglu_bwd(dtype, shape):
    """da, db, g against fp64, each within 2× the error of torch's own ops at the same precision (aten's
    SiLU backward for da, silu then a product for db and g). dg is a column slice, a a column-major view,
    b contiguous: all read in place."""
    M, N = shape
    dg = strided(rand(M, N, dtype=dtype), "slice")
    a = strided(rand(M, N, dtype=dtype, scale=3.0), "transpose")
    b = rand(M, N, dtype=dtype)
    da, db, g = swiglu_bwd(dg, a, b)
    assert all(t.dtype == dtype and t.shape == (M, N) and t.is_contiguous() for t in (da, db, g))
    own = (torch.ops.aten.silu_backward(dg * b, a), dg * torch.nn.functional.silu(a),
           torch.nn.functional.silu(a) * b)
    for what, got, t, exact in zip(("da", "db", "g"), (da, db, g), own, _swiglu_bwd_exact(dg, a, b)):
        assert_within_torch(f"{what} ({dtype}, {shape})", got, t, exact, factor(dtype), FLOOR[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 200), (37, 106), (277, 64), (5, 1030)])
def test_swiglu_bwd(dtype, shape):
    """The backward's pass alone (bf16 too: no tl.dot in it). Rows 1, 37 and 277 (277 = five of the
    interpreter's 64-row programs, the last one masked), widths 200 and 106 (one masked column block), 64
    and 1030 (two column blocks, the second 6 wide)."""
    _check_swiglu_bwd(dtype, shape)


@requires_cuda
def test_swiglu_bwd_bf16_imf_b2_on_gpu():
    """bf16 at the iMF-B/2 MLP's hidden size (B 4 × 260 tokens, hidden 2048)."""
    _check_swiglu_bwd(torch.bfloat16, (1040, 2048))


def test_swiglu_bwd_extreme_pre_activations_and_no_rows():
    """silu and silu' at |a| up to 1e4 with dg = b = 1 (da = silu'(a), db = g = silu(a)): finite and equal
    to fp64. No rows: empty (0, N) outputs."""
    a = torch.tensor([[-1e4, -3e3, -100.0, -9.0, -1e-3, 0.0, 1e-3, 9.0, 100.0, 3e3, 1e4]], device=DEVICE)
    one = torch.ones_like(a)
    got = swiglu_bwd(one, a, one)
    for what, t, exact in zip(("da", "db", "g"), got, _swiglu_bwd_exact(one, a, one)):
        assert torch.isfinite(t).all() and rel_err(t, exact) < 1e-6, (what, t, exact)
    empty = torch.empty(0, 96, device=DEVICE)
    assert all(t.shape == (0, 96) for t in swiglu_bwd(empty, empty, empty))


# =================================================================================================
#                         Reverse mode under torch.func (launch.backward_once)
# =================================================================================================
def _func_case(dtype, seed=0):
    """name → (function of (x, W1, W3, W2) returning y, reference, inputs in ``dtype``)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64, device=DEVICE, generator=gen) * scale).to(dtype)
    x, xd = r(2, 7, 40), r(2, 7, 40)
    inputs = [x, r(106, 40, scale=0.3), r(106, 40, scale=0.15), r(40, 106, scale=0.1)]
    return {"swiglu": (swiglu, swiglu_ref, inputs),
            "swiglu_jvp": (lambda *a: swiglu_jvp(*a, xd)[0], lambda *a: swiglu_jvp_ref(*a, xd)[0], inputs)}


@pytest.mark.parametrize("name", ["swiglu", "swiglu_jvp"])
def test_func_grad_and_vjp(name, seed, bwd_launches):
    """torch.func.grad equals plain autograd through the same kernels and the fp64 reference; a vjp_fn
    called after torch.func.vjp has returned (saved tensors of a finished level) too. Each of the three
    backwards runs the Triton pass (under torch.func through its custom op)."""
    fn, _, inputs = _func_case(torch.float32, seed)[name]
    _, ref, inputs64 = _func_case(torch.float64, seed)[name]
    cot = torch.randn(2, 7, 40, dtype=torch.float64, device=DEVICE)
    got = torch.func.grad(lambda *a: (fn(*a) * cot.float()).sum(), argnums=(0, 1, 2, 3))(*inputs)
    leaves = [t.clone().requires_grad_() for t in inputs]
    plain = torch.autograd.grad((fn(*leaves) * cot.float()).sum(), leaves)
    leaves64 = [t.clone().requires_grad_() for t in inputs64]
    exact = torch.autograd.grad((ref(*leaves64) * cot).sum(), leaves64)
    _, vjp_fn = torch.func.vjp(fn, *inputs)
    after = vjp_fn(cot.float())
    for i, (a, p, v, e) in enumerate(zip(got, plain, after, exact)):
        assert torch.equal(a, p), f"input {i}: torch.func.grad differs from autograd"
        assert rel_err(a, e) <= 1e-5 and rel_err(v, e) <= 1e-5, (i, rel_err(a, e), rel_err(v, e))
    assert bwd_launches == [(14, 106)] * 3


def test_second_transform_level_refuses():
    """A grad of a grad and a jvp of a grad would differentiate the kernels' backward: an error, never a
    silent zero."""
    fn, _, (x, *rest) = _func_case(torch.float32)["swiglu"]

    def first(x_):
        return fn(x_, *rest).sum()

    for second in (lambda: torch.func.grad(lambda x_: torch.func.grad(first)(x_).square().sum())(x),
                   lambda: torch.func.jvp(torch.func.grad(first), (x,), (torch.randn_like(x),))):
        with pytest.raises((NotImplementedError, RuntimeError), match="not differentiable|implement the jvp"):
            second()


# =================================================================================================
#                                    Loud validation
# =================================================================================================
def _bad_calls():
    x = f32(2, 5, 8)
    w1, w3, w2 = f32(12, 8), f32(12, 8), f32(8, 12)
    cases = [
        ("w3", lambda: swiglu_jvp(x, w1, f32(11, 8), w2, x), r"swiglu_jvp: w3 must have shape \(12, 8\)"),
        ("w2", lambda: swiglu_jvp(x, w1, w3, f32(8, 11), x), r"swiglu_jvp: w2 must have shape \(out_features, 12\)"),
        ("x", lambda: swiglu_jvp(f32(2, 5, 7), w1, w3, w2, f32(2, 5, 7)),
         r"swiglu_jvp: x must have shape \(\.\.\., 8\)"),
        ("x_dot-shape", lambda: swiglu_jvp(x, w1, w3, w2, f32(2, 4, 8)),
         r"swiglu_jvp: x_dot must have shape \(2, 5, 8\)"),
        ("x_dot-none", lambda: swiglu_jvp(x, w1, w3, w2, None), "swiglu_jvp: x_dot must be a tensor"),
        ("x_dot-dtype", lambda: swiglu_jvp(x, w1, w3, w2, x.half()), "swiglu_jvp: x_dot has dtype torch.float16"),
        ("w1-1d", lambda: swiglu_jvp(x, w1[0], w3, w2, x), "swiglu_jvp: w1 must be 2-D"),
        ("int", lambda: swiglu_jvp(x.long(), w1, w3, w2, x), "swiglu_jvp: x has dtype torch.int64; supported"),
        ("primal-w3", lambda: swiglu(x, w1, f32(12, 7), w2), r"swiglu: w3 must have shape \(12, 8\)"),
        ("primal-w2", lambda: swiglu(x, w1, w3, f32(8, 13)), r"swiglu: w2 must have shape \(out_features, 12\)"),
        ("primal-x", lambda: swiglu(f32(2, 5, 7), w1, w3, w2), r"swiglu: x must have shape \(\.\.\., 8\)"),
        ("primal-w2-3d", lambda: swiglu(x, w1, w3, w2[None]), "swiglu: w2 must be 2-D"),
        ("primal-mixed", lambda: swiglu(x, w1, w3.half(), w2), "swiglu: w3 has dtype torch.float16"),
        ("primal-tensor", lambda: swiglu(x, w1.tolist(), w3, w2), "swiglu: w1 must be a torch.Tensor"),
        ("gate-launcher", lambda: swiglu_gate_fwd(x, w1, f32(12, 9)), r"swiglu \(gate\): w3 must have shape"),
        ("fwd-launcher", lambda: swiglu_fwd(x, w1, w3, f32(8, 11)), r"swiglu: w2 must have shape"),
        ("jvp-launcher", lambda: swiglu_jvp_fwd(x, w1, w3, w2, f32(2, 8)), r"swiglu_jvp: x_dot must have shape"),
        ("bwd-dg", lambda: swiglu_bwd(f32(4, 5), f32(4, 6), f32(4, 6)), r"swiglu_bwd: dg must have shape \(4, 6\)"),
        ("bwd-b", lambda: swiglu_bwd(f32(4, 6), f32(4, 6), f32(6, 4)), r"swiglu_bwd: b must have shape \(4, 6\)"),
        ("bwd-3d", lambda: swiglu_bwd(x, x, x), "swiglu_bwd: a must be 2-D"),
        ("bwd-dtype", lambda: swiglu_bwd(f32(4, 6).half(), f32(4, 6), f32(4, 6)),
         "swiglu_bwd: a has dtype torch.float32 but dg has torch.float16"),
        ("bwd-int", lambda: swiglu_bwd(f32(4, 6), f32(4, 6), f32(4, 6).long()), "swiglu_bwd: b has dtype torch.int64"),
        ("bwd-tensor", lambda: swiglu_bwd(f32(4, 6), f32(4, 6).tolist(), f32(4, 6)),
         "swiglu_bwd: a must be a torch.Tensor"),
    ]
    if not HAS_CUDA:
        bf = [t.bfloat16() for t in (x, w1, w3, w2)]
        msg = "bfloat16 is not supported in Triton's CPU interpreter"
        cases += [("bf16-interp", lambda: swiglu_jvp(*bf, bf[0]), msg),
                  ("primal-bf16-interp", lambda: swiglu(*bf), msg),
                  ("gate-bf16-interp", lambda: swiglu_gate_fwd(*bf[:3]), msg)]

        def without_interpreter(fn, *args):
            def call():
                with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}):
                    fn(*args)
            return call
        cases += [("no-interpreter", without_interpreter(swiglu_jvp, x, w1, w3, w2, x), "TRITON_INTERPRET=1"),
                  ("primal-no-interpreter", without_interpreter(swiglu, x, w1, w3, w2), "TRITON_INTERPRET=1"),
                  ("bwd-no-interpreter", without_interpreter(swiglu_bwd, w1, w1, w3),
                   "swiglu_bwd: .*TRITON_INTERPRET=1")]
    return cases


@pytest.mark.parametrize("call,match", [pytest.param(c, m, id=i) for i, c, m in _bad_calls()])
def test_invalid_inputs_raise_value_error(call, match):
    check_raises_value_error(call, match)


# ---------------------------------------------------------------------------------------------------- references
# The pure-torch references themselves: each primal against an independent computation (torch's own op or the
# formula written out), each explicit tangent rule against torch.func.jvp of its primal, in fp64 at odd shapes;
# tangents carry no graph, primals stay differentiable.
@pytest.mark.parametrize("rows,D,hidden", [((2, 7), 40, 106), ((1, 33), 24, 64), ((3,), 9, 5)])
def test_swiglu_primal_and_jvp(rows, D, hidden):
    x, x_dot = r64(*rows, D), r64(*rows, D)
    w1, w3, w2 = r64(hidden, D) / D ** 0.5, r64(hidden, D) / D ** 0.5, r64(D, hidden) / hidden ** 0.5
    a, b = x @ w1.T, x @ w3.T
    assert rel_err(swiglu_ref(x, w1, w3, w2), (a / (1 + torch.exp(-a)) * b) @ w2.T) <= 1e-14
    ref = torch.func.jvp(lambda x_: swiglu_ref(x_, w1, w3, w2), (x,), (x_dot,))
    assert_jvp(swiglu_jvp_ref(x, w1, w3, w2, x_dot), ref)




def test_swiglu_jvp_ref_primal_is_differentiable_like_the_plain_ref():
    """Gradients through the rule's primal equal those through the plain ``swiglu_ref``."""
    x = r64(3, 8).requires_grad_()
    w1, w3, w2 = (r64(*s).requires_grad_() for s in ((5, 8), (5, 8), (8, 5)))
    g1 = torch.autograd.grad(swiglu_jvp_ref(x, w1, w3, w2, r64(3, 8))[0].sum(), (x, w1, w3, w2))
    g2 = torch.autograd.grad(swiglu_ref(x, w1, w3, w2).sum(), (x, w1, w3, w2))
    for a, b in zip(g1, g2):
        assert rel_err(a, b) <= 1e-14
