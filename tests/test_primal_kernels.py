"""Primal-only Triton kernels of the DiT's plain forward: ``ln_modulate``, ``gated_residual`` and ``mlp``
(fc1 + GELU in Triton, fc2 on cuBLAS): the dual kernels with HAS_TANGENT=False.

Same cases and tolerance rule as tests/test_dual_kernels.py (whose input factories this file reuses):
odd shapes (rows 7 and 33, D = 72 and 40, hidden 96 and 100), contiguous and strided inputs, fp32 and
fp16 (and bf16 for the elementwise kernels on the CPU); the kernel's relative error against the fp64
reference must be ≤ 2 × the error of torch's own ``_ref`` at that precision + a small floor, for the
output and for every gradient.
"""
import importlib

import pytest
import torch

from meanflow_fast.kernels import config
from meanflow_fast.kernels.gated_residual import gated_residual, gated_residual_fwd, gated_residual_jvp
from meanflow_fast.kernels.layernorm_modulate import ln_modulate, ln_modulate_fwd, ln_modulate_jvp, ln_modulate_ref
from meanflow_fast.kernels.linear import dual_linear_fwd
from meanflow_fast.kernels.mlp import mlp, mlp_ref
from tests.helpers import HAS_CUDA, OpLog, assert_within_torch, rel_err, requires_cuda
from tests.test_dual_kernels import DEVICE, FLOOR, OPS, Case, _dit_case, _factor, _grads, _to

PRIMAL = {"ln_modulate": ln_modulate, "gated_residual": gated_residual, "mlp": mlp}


def _cases():
    out = []
    for name in PRIMAL:
        op = OPS[name]
        dtypes = [torch.float32, torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float32, torch.float16]
        if not op.matmul and not HAS_CUDA:
            dtypes.append(torch.bfloat16)  # elementwise kernels: the interpreter handles bf16 loads/stores
        for dtype in dtypes:
            for shape in op.shapes:
                for strided in (False, True):
                    out.append(pytest.param(name, dtype, shape, strided,
                                            id=f"{name}-{str(dtype)[6:]}-{shape}-{'strided' if strided else 'contig'}"))
    return out


# =================================================================================================
#                   Output and gradients against fp64 references (torch's error as the yardstick)
# =================================================================================================
@pytest.mark.parametrize("name,dtype,shape,strided", _cases())
def test_primal_kernel_matches_reference(name, dtype, shape, strided):
    op, fn = OPS[name], PRIMAL[name]
    case = op.make(shape, dtype, strided)
    y64 = op.ref(*[_to(p, torch.float64) for p in case.primals])
    y_t = op.ref(*case.primals)  # torch's own error at this precision
    y = fn(*case.primals)
    assert y.dtype == dtype and y.shape == y64.shape
    assert_within_torch("output", y, y_t, y64, _factor(dtype), FLOOR[dtype])

    weight = torch.randn(y64.shape, dtype=torch.float64, device=DEVICE).to(dtype)
    g = _grads(lambda ins: fn(*ins), case.primals, weight)
    g64 = _grads(lambda ins: op.ref(*ins), [_to(p, torch.float64) for p in case.primals], weight)
    g_t = _grads(lambda ins: op.ref(*ins), [_to(p, dtype) for p in case.primals], weight)
    names = [f"arg{i}" for i, p in enumerate(case.primals) if p is not None]
    for nm, a, t, e in zip(names, g, g_t, g64):
        assert a.dtype == dtype and a.shape == e.shape, nm
        assert_within_torch(f"grad {nm}", a, t, e, _factor(dtype), FLOOR[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_primal_launch_equals_the_primal_stream_of_the_dual_launch(dtype):
    """HAS_TANGENT=False only drops the tangent: the primal outputs (and the saved statistics and
    pre-activation) are bit-identical to those of the dual launch."""
    ln = OPS["ln_modulate"].make((3, 11, 40), dtype, True)
    m, m_none, mean, rstd = ln_modulate_fwd(*ln.primals)
    m_d, _, mean_d, rstd_d = ln_modulate_fwd(*ln.primals, *ln.tangents)
    assert m_none is None
    assert torch.equal(m, m_d) and torch.equal(mean, mean_d) and torch.equal(rstd, rstd_d)

    gr = OPS["gated_residual"].make((3, 11, 40), dtype, True)
    y, y_none = gated_residual_fwd(*gr.primals)
    assert y_none is None and torch.equal(y, gated_residual_fwd(*gr.primals, *gr.tangents)[0])

    ml = OPS["mlp"].make(((3, 11), 40, 100), dtype, True)
    x, w1, b1 = ml.primals[:3]
    h, h_none, a = dual_linear_fwd(x, w1, b1, None, gelu=True, store_pre=True)
    h_d, _, a_d = dual_linear_fwd(x, w1, b1, ml.tangents[0], gelu=True, store_pre=True)
    assert h_none is None and torch.equal(h, h_d) and torch.equal(a, a_d)


@pytest.mark.parametrize("name", list(PRIMAL))
def test_primal_saves_what_the_dual_backward_needs(name):
    """The primal Functions keep what the dual ones keep (x, scale, mean, rstd; gate, f; x, a, W1, W2),
    and nothing at all without grad."""
    op, fn = OPS[name], PRIMAL[name]
    case = op.make(op.shapes[0], torch.float32, False)
    params = [None if p is None else p.detach().requires_grad_() for p in case.primals]
    for grad, expected in ((True, {"ln_modulate": 4, "gated_residual": 2, "mlp": 4}[name]), (False, 0)):
        saved = []

        def pack(t):
            saved.append(t)
            return t
        with torch.set_grad_enabled(grad), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = fn(*params)
        assert len(saved) == expected and y.requires_grad == grad


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
    with pytest.raises(ValueError, match=r"MEANFLOW_FAST_NO_GRAD_FC1 must be one of 'cublaslt', 'triton', got 'cublas'"):
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
    case = _dit_case("mlp")
    bf = [_to(p, torch.bfloat16) for p in case.primals]
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
    try:
        with torch.no_grad(), OpLog() as log:
            y = mlp(*bf)
        y32, y_t = mlp_ref(*[_to(p, torch.float32) for p in bf]), mlp_ref(*bf)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert_within_torch(f"output ({impl})", y, y_t, y32, 2, 1e-3)
    ran = {"cublaslt": "aten._addmm_activation", "triton": "meanflow_fast.linear_gelu_fwd"}
    assert ran[impl] in log.ops and all(ran[o] not in log.ops for o in ran if o != impl), log.ops


def test_ln_modulate_eps():
    case = OPS["ln_modulate"].make((2, 33, 72), torch.float32, True)
    x, shift, scale = case.primals
    m = ln_modulate(x, shift, scale, eps=1e-2)
    assert rel_err(m, ln_modulate_ref(x.double(), shift.double(), scale.double(), eps=1e-2)) < 1e-5
    assert rel_err(m, ln_modulate_ref(x.double(), shift.double(), scale.double())) > 1e-4  # eps is used


# =================================================================================================
#                                    Loud validation
# =================================================================================================
def _f32(*shape):
    return torch.randn(*shape, device=DEVICE)


def _bad_calls():
    x = _f32(2, 5, 8)
    w1, b1, w2, b2 = _f32(12, 8), _f32(12), _f32(8, 12), _f32(8)
    s = _f32(2, 8)
    cases = [
        ("ln-2d", lambda: ln_modulate(x[0], s, s), r"ln_modulate: x must be 3-D"),
        ("ln-shift", lambda: ln_modulate(x, _f32(2, 9), s), r"ln_modulate: shift must have shape \(2, 8\)"),
        ("ln-scale", lambda: ln_modulate(x, s, _f32(3, 8)), r"ln_modulate: scale must have shape \(2, 8\)"),
        ("ln-eps", lambda: ln_modulate(x, s, s, eps=-1.0), "eps must be a non-negative float"),
        ("ln-dtype", lambda: ln_modulate(x, s.half(), s), "shift has dtype torch.float16"),
        ("ln-fp64", lambda: ln_modulate(x.double(), s.double(), s.double()), "supported dtypes"),
        ("ln-d0", lambda: ln_modulate(_f32(2, 5, 0), _f32(2, 0), _f32(2, 0)), "D = 0"),
        ("ln-partial-tangent", lambda: ln_modulate_jvp(x, s, s, x, None, s), "must be given together"),
        ("gated-gate", lambda: gated_residual(x, x, x), r"gated_residual: gate must have shape \(2, 8\)"),
        ("gated-f", lambda: gated_residual(x, s, x[:, :3]), r"gated_residual: f must have shape \(2, 5, 8\)"),
        ("gated-int", lambda: gated_residual(x.long(), s.long(), x.long()), "supported dtypes"),
        ("gated-device", lambda: gated_residual(x, s, torch.empty(2, 5, 8, device="meta")), "is on meta"),
        ("gated-partial-tangent", lambda: gated_residual_jvp(x, s, x, None, s, x), "must be given together"),
        ("mlp-w2", lambda: mlp(x, w1, b1, _f32(8, 11), b2), r"mlp: w2 must have shape \(out_features, 12\)"),
        ("mlp-b1", lambda: mlp(x, w1, _f32(8), w2, b2), r"mlp: b1 must have shape \(12,\)"),
        ("mlp-b2", lambda: mlp(x, w1, b1, w2, _f32(7)), r"mlp: b2 must have shape \(8,\)"),
        ("mlp-x", lambda: mlp(_f32(2, 5, 7), w1, b1, w2, b2), r"mlp: x must have shape \(\.\.\., 8\)"),
        ("mlp-w1-1d", lambda: mlp(x, w1[0], b1, w2, b2), "w1 must be 2-D"),
        ("mlp-mixed", lambda: mlp(x, w1.half(), b1, w2, b2), "w1 has dtype torch.float16"),
    ]
    if not HAS_CUDA:
        cases.append(("mlp-bf16-interp", lambda: mlp(*(t.bfloat16() for t in (x, w1, b1, w2, b2))),
                      "bfloat16 is not supported in Triton's CPU interpreter"))
    return cases


@pytest.mark.parametrize("call,match", [pytest.param(c, m, id=i) for i, c, m in _bad_calls()])
def test_invalid_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only: the interpreter switch")
@pytest.mark.parametrize("name", list(PRIMAL))
def test_cpu_without_interpreter_says_so(name, monkeypatch):
    op = OPS[name]
    case = op.make(op.shapes[0], torch.float32, False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        PRIMAL[name](*case.primals)


# =================================================================================================
#                         torch.library custom ops and torch.compile
# =================================================================================================
def test_primal_custom_ops_pass_opcheck():
    x, w, b = _f32(2, 5, 40), _f32(72, 40), _f32(72)
    sh, sc, g = _f32(2, 6 * 40).chunk(6, 1)[:3]
    ops = torch.ops.meanflow_fast
    for op, args in ((ops.ln_modulate_primal_fwd, (x, sh, sc, 1e-6)),
                     (ops.gated_residual_primal_fwd, (x, g, _f32(2, 5, 40))),
                     (ops.linear_gelu_fwd, (x, w, b, True)),
                     (ops.linear_gelu_fwd, (x, w, None, False))):
        result = torch.library.opcheck(op.default, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def _block(x, mod, w1, b1, w2, b2):
    """A DiT-block-like chain of the three primal ops (the mod tensors split like adaLN's chunk)."""
    sh, sc, g = mod.chunk(3, dim=1)
    return gated_residual(x, g, mlp(ln_modulate(x, sh, sc, 1e-6), w1, b1, w2, b2))


def _compare_compiled(backend, B, N, D, H, dtype, tol):
    def r(*s, scale=1.0):
        return (torch.randn(*s, device=DEVICE) * scale).to(dtype).requires_grad_()
    args = (r(B, N, D), r(B, 3 * D, scale=0.5), r(H, D, scale=D ** -0.5), r(H), r(D, H, scale=H ** -0.5), r(D))
    y = _block(*args)
    g = torch.autograd.grad(y.float().square().sum(), args)
    torch._dynamo.reset()
    y_c = torch.compile(_block, backend=backend, fullgraph=True)(*args)
    g_c = torch.autograd.grad(y_c.float().square().sum(), args)
    assert rel_err(y_c, y) <= tol
    for a, b in zip(g_c, g):
        assert rel_err(a, b) <= tol


def test_primal_ops_trace_with_aot_eager():
    """Each launch is one opaque custom op: aot_eager traces the chain (fullgraph) and equals eager."""
    _compare_compiled("aot_eager", 2, 5, 40, 72, torch.float32, 1e-6)


@requires_cuda
def test_primal_torch_compile_matches_eager_on_gpu():
    _compare_compiled("inductor", 4, 64, 128, 512, torch.bfloat16, 1e-2)


# =================================================================================================
#                         GPU: bf16 at DiT-B/2 shapes against an fp32 reference
# =================================================================================================
@requires_cuda
@pytest.mark.parametrize("name", list(PRIMAL))
def test_primal_bf16_dit_b2_shapes_on_gpu(name):
    op, fn = OPS[name], PRIMAL[name]
    case = _dit_case(name)  # fp32 inputs at B = 4, N = 256, D = 768, hidden 3072; the bf16 run sees them rounded
    bf = Case([_to(p, torch.bfloat16) for p in case.primals], case.tangents)
    ref_primals = [_to(p, torch.float32) for p in bf.primals]
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
    try:
        y32, y_t, y = op.ref(*ref_primals), op.ref(*bf.primals), fn(*bf.primals)
        assert_within_torch("output", y, y_t, y32, 2, 1e-3)
        weight = torch.randn(y32.shape, device=DEVICE).to(torch.bfloat16)
        g = _grads(lambda ins: fn(*ins), bf.primals, weight)
        g32 = _grads(lambda ins: op.ref(*ins), ref_primals, weight)
        g_t = _grads(lambda ins: op.ref(*ins), bf.primals, weight)
        for i, (a, t, e) in enumerate(zip(g, g_t, g32)):
            assert_within_torch(f"grad {i}", a, t, e, 2, 1e-3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


# =================================================================================================
#               Forward mode: torch.func.jvp over the primal functions runs the dual kernels
# =================================================================================================
@pytest.mark.parametrize("name,weight_tangents", [("ln_modulate", False), ("gated_residual", False),
                                                  ("mlp", False), ("mlp", True)],
                         ids=["ln_modulate", "gated_residual", "mlp", "mlp-with-weight-tangents"])
def test_func_jvp_over_primal_functions(name, weight_tangents):
    """torch.func.jvp over ``ln_modulate`` / ``gated_residual`` / ``mlp`` (the ops of the plain forward
    with backend="triton") against torch.func.jvp over the fp64 reference, fp32. Every non-None input
    gets a tangent: shift, scale and gate tangents go to the dual kernel; with ``weight_tangents`` the
    MLP's weights and biases get tangents too (its jvp then takes the explicit rule in torch)."""
    op = OPS[name]
    case = op.make(op.shapes[1], torch.float32, True)
    tangents = [None if p is None else (t if t is not None else torch.randn_like(p))
                for p, t in zip(case.primals, case.tangents)]
    if name == "mlp" and not weight_tangents:
        tangents = [tangents[0]] + [None] * 4
    idx = [i for i, t in enumerate(tangents) if t is not None]

    def call(fn, dtype):
        prim = [_to(p, dtype) for p in case.primals]

        def f(*xs):
            args = list(prim)
            for i, x in zip(idx, xs):
                args[i] = x
            return fn(*args)
        return torch.func.jvp(f, tuple(prim[i] for i in idx), tuple(_to(tangents[i], dtype) for i in idx))

    y, y_dot = call(PRIMAL[name], torch.float32)
    y64, y_dot64 = call(op.ref, torch.float64)
    assert rel_err(y, y64) <= 1e-5 and rel_err(y_dot, y_dot64) <= 1e-5, (rel_err(y, y64), rel_err(y_dot, y_dot64))
