"""Dual-stream (primal + tangent) Triton kernels: linear, MLP, LayerNorm-modulate, gated residual.

On a machine without CUDA the kernels run in Triton's interpreter (tests/conftest.py), at small odd
shapes (rows 7 and 33, D = 72 and 40, hidden 96 and 100), in fp32 and fp16 (and bf16 for the
elementwise kernels: the interpreter's bf16 tl.dot is broken, triton issue #11584). With CUDA the same
tests run on the GPU, bf16 included, plus DiT-B/2-sized bf16 checks and torch.compile.

Tolerances follow flash-attention's rule (STYLE.md §7): the kernel's relative error against an fp64
reference must be ≤ 2 × the error of torch itself at the same precision (the `_ref` run in that
dtype) + a small floor.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import pytest
import torch

from meanflow_fast.kernels import config
from meanflow_fast.kernels.gated_residual import gated_residual_jvp, gated_residual_jvp_ref, gated_residual_ref
from meanflow_fast.kernels.layernorm_modulate import ln_modulate_jvp, ln_modulate_jvp_ref, ln_modulate_ref
from meanflow_fast.kernels.linear import dual_linear_fwd, linear_jvp, linear_jvp_ref, linear_ref
from meanflow_fast.kernels.mlp import gelu_bwd, gelu_tanh_grad, mlp_jvp, mlp_jvp_ref, mlp_ref
from tests.helpers import HAS_CUDA, assert_within_torch, rel_err, requires_cuda

DEVICE = "cuda" if HAS_CUDA else "cpu"
# Floor added to 2× torch's error, in ‖·‖-relative error: ~1/4 of the unit roundoff of each dtype
# (fp32 6e-8, fp16 4.9e-4, bf16 3.9e-3), well below the errors measured here (≈ 0.4–1 roundoff).
FLOOR = {torch.float32: 1e-8, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _factor(dtype) -> float:
    """The 2× rule, doubled for bf16 in the interpreter: its fp32 → bf16 conversion truncates instead
    of rounding to nearest (checked on N(0, 1) values: mean |error| 2.3e-3 vs 1.1e-3 for torch), so
    every bf16 store there carries twice torch's rounding error. CUDA rounds to nearest: 2×."""
    return 4.0 if (dtype == torch.bfloat16 and not HAS_CUDA) else 2.0


# =================================================================================================
#                              Op table: inputs, references, kernels
# =================================================================================================
def _strided(t: torch.Tensor, how: str) -> torch.Tensor:
    """A non-contiguous tensor with t's values. "slice": a column slice of a wider tensor (rows with a
    larger stride, the kernels read it in place); "transpose": leading dims that cannot be merged
    (the launchers' reshape copies). For 2-D weights "transpose" gives a column-major view."""
    if how == "slice":
        wide = torch.empty(*t.shape[:-1], t.shape[-1] + 8, dtype=t.dtype, device=t.device)
        wide[..., : t.shape[-1]] = t
        return wide[..., : t.shape[-1]]
    if how == "transpose":
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if how == "step":  # 1-D: every other element
        wide = torch.empty(2 * t.numel(), dtype=t.dtype, device=t.device)
        wide[::2] = t
        return wide[::2]
    raise ValueError(how)


@dataclass
class Case:
    primals: List[Optional[torch.Tensor]]   # the `_ref` arguments (None for an absent bias)
    tangents: List[Optional[torch.Tensor]]  # one per primal; None for constants of the tangent (weights)


@dataclass
class Op:
    name: str
    ref: Callable
    jvp: Callable
    jvp_ref: Callable
    shapes: Sequence[tuple]
    make: Callable  # (shape, dtype, strided: bool) -> Case
    matmul: bool    # uses tl.dot (no bf16 in the interpreter)


def _rand(*shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, dtype=torch.float64, device=DEVICE) * scale + shift).to(dtype)


def _make_linear(shape, dtype, strided):
    lead, k, n = shape
    x, xd = _rand(*lead, k, dtype=dtype), _rand(*lead, k, dtype=dtype)
    w, b = _rand(n, k, dtype=dtype, scale=k ** -0.5), _rand(n, dtype=dtype)
    if strided:
        x, xd, w, b = _strided(x, "slice"), _strided(xd, "transpose"), _strided(w, "transpose"), _strided(b, "step")
    return Case([x, w, b], [xd, None, None])


def _make_mlp(shape, dtype, strided):
    lead, d, h = shape
    x, xd = _rand(*lead, d, dtype=dtype), _rand(*lead, d, dtype=dtype)
    w1, b1 = _rand(h, d, dtype=dtype, scale=2 * d ** -0.5), _rand(h, dtype=dtype, scale=0.5)
    w2, b2 = _rand(d, h, dtype=dtype, scale=h ** -0.5), _rand(d, dtype=dtype)
    if strided:
        x, xd = _strided(x, "slice"), _strided(xd, "transpose")
        w1, w2 = _strided(w1, "transpose"), _strided(w2, "slice")
    return Case([x, w1, b1, w2, b2], [xd, None, None, None, None])


def _modulation(b, d, dtype, k, strided):
    """k (B, D) tensors; strided: the chunks of one (B, 6D) tensor, as DiTBlock's adaLN produces them."""
    if strided:
        return list(_rand(b, 6 * d, dtype=dtype).chunk(6, dim=1)[:k])
    return [_rand(b, d, dtype=dtype) for _ in range(k)]


def _make_ln(shape, dtype, strided):
    b, n, d = shape
    x, xd = _rand(b, n, d, dtype=dtype, scale=2.0, shift=0.5), _rand(b, n, d, dtype=dtype)
    shift, scale = _modulation(b, d, dtype, 2, strided)
    shift_d, scale_d = _modulation(b, d, dtype, 2, strided)
    if strided:
        x, xd = _strided(x, "slice"), _strided(xd, "transpose")
    return Case([x, shift, scale], [xd, shift_d, scale_d])


def _make_gated(shape, dtype, strided):
    b, n, d = shape
    x, f, xd, fd = (_rand(b, n, d, dtype=dtype) for _ in range(4))
    (g,), (gd,) = _modulation(b, d, dtype, 1, strided), _modulation(b, d, dtype, 1, strided)
    if strided:
        x, f, xd, fd = _strided(x, "slice"), _strided(f, "transpose"), _strided(xd, "transpose"), _strided(fd, "slice")
    return Case([x, g, f], [xd, gd, fd])


OPS = {
    "linear": Op("linear", linear_ref, linear_jvp, linear_jvp_ref,
                 [((7,), 72, 40), ((3, 11), 40, 72)], _make_linear, True),
    "mlp": Op("mlp", mlp_ref, mlp_jvp, mlp_jvp_ref,
              [((1, 7), 72, 96), ((3, 11), 40, 100)], _make_mlp, True),
    "ln_modulate": Op("ln_modulate", ln_modulate_ref, ln_modulate_jvp, ln_modulate_jvp_ref,
                      [(1, 7, 72), (3, 11, 40)], _make_ln, False),
    "gated_residual": Op("gated_residual", gated_residual_ref, gated_residual_jvp, gated_residual_jvp_ref,
                         [(1, 7, 72), (3, 11, 40)], _make_gated, False),
}


def _jvp_args(case: Case):
    """The `_jvp` / `_jvp_ref` argument list: the primals, then the tangents of the non-constant ones."""
    return list(case.primals) + [t for t in case.tangents if t is not None]


def _to(t, dtype):
    return None if t is None else t.detach().to(dtype)


def _func_jvp(op: Op, case: Case, dtype):
    """torch.func.jvp over op.ref with every input cast to dtype (constants get zero tangents)."""
    primals = [_to(p, dtype) for p in case.primals]
    tangents = [(_to(t, dtype) if t is not None else (None if p is None else torch.zeros_like(p)))
                for p, t in zip(primals, case.tangents)]
    keep = [i for i, p in enumerate(primals) if p is not None]

    def f(*args):
        full = list(primals)
        for i, a in zip(keep, args):
            full[i] = a
        return op.ref(*full)

    return torch.func.jvp(f, tuple(primals[i] for i in keep), tuple(tangents[i] for i in keep))


def _grads(fn, inputs, weight):
    """Gradients of the random loss Σ fn(inputs) ⊙ weight with respect to every non-None input."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]  # keeps the strides
    out = fn(leaves)
    params = [t for t in leaves if t is not None]
    return torch.autograd.grad((out.double() * weight.double()).sum(), params)


def _cases(dtypes_cpu, dtypes_cuda):
    out = []
    for name, op in OPS.items():
        dtypes = list(dtypes_cuda if HAS_CUDA else dtypes_cpu)
        if not op.matmul and not HAS_CUDA:
            dtypes.append(torch.bfloat16)  # elementwise kernels: the interpreter handles bf16 loads/stores
        for dtype in dtypes:
            for shape in op.shapes:
                for strided in (False, True):
                    out.append(pytest.param(name, dtype, shape, strided,
                                            id=f"{name}-{str(dtype)[6:]}-{shape}-{'strided' if strided else 'contig'}"))
    return out


# =================================================================================================
#                        The `_jvp_ref` functions against torch.func.jvp (fp64)
# =================================================================================================
@pytest.mark.parametrize("name", list(OPS))
def test_jvp_ref_matches_func_jvp(name):
    op = OPS[name]
    case = op.make(op.shapes[1], torch.float64, False)
    y_ref, yd_ref = _func_jvp(op, case, torch.float64)
    y, y_dot = op.jvp_ref(*_jvp_args(case))
    assert rel_err(y, y_ref) <= 1e-10 and rel_err(y_dot, yd_ref) <= 1e-10
    assert not y_dot.requires_grad


# =================================================================================================
#                 The kernels: primal, tangent and gradients against fp64 references
# =================================================================================================
@pytest.mark.parametrize("name,dtype,shape,strided", _cases([torch.float32, torch.float16],
                                                             [torch.float32, torch.float16, torch.bfloat16]))
def test_kernel_matches_reference(name, dtype, shape, strided):
    op = OPS[name]
    case = op.make(shape, dtype, strided)
    y64, yd64 = _func_jvp(op, case, torch.float64)
    y_t, yd_t = _func_jvp(op, case, dtype)  # torch's own error at this precision

    y, y_dot = op.jvp(*_jvp_args(case))
    assert y.dtype == dtype and y_dot.dtype == dtype and y.shape == y64.shape and y_dot.shape == yd64.shape
    assert not y_dot.requires_grad and y_dot.grad_fn is None
    for what, got, torch_own, exact in (("primal", y, y_t, y64), ("tangent", y_dot, yd_t, yd64)):
        assert_within_torch(what, got, torch_own, exact, _factor(dtype), FLOOR[dtype])

    # Gradients of a random loss on y, through the kernel's backward vs autograd through the ref.
    weight = torch.randn(y64.shape, dtype=torch.float64, device=DEVICE).to(dtype)
    tangents = [t for t in case.tangents if t is not None]

    def kernel_fn(ins):
        return op.jvp(*ins, *tangents)[0]

    g = _grads(kernel_fn, case.primals, weight)
    g64 = _grads(lambda ins: op.ref(*ins), [_to(p, torch.float64) for p in case.primals], weight)
    g_t = _grads(lambda ins: op.ref(*ins), [_to(p, dtype) for p in case.primals], weight)
    names = [f"arg{i}" for i, p in enumerate(case.primals) if p is not None]
    for nm, a, t, e in zip(names, g, g_t, g64):
        assert a.dtype == dtype and a.shape == e.shape, nm
        assert_within_torch(f"grad {nm}", a, t, e, _factor(dtype), FLOOR[dtype])


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("name", ["ln_modulate", "gated_residual"])
def test_backward_token_loop(name, steps, monkeypatch):
    """The row-reducing backwards walk ``steps`` tiles of a batch element's tokens per program (the GPU
    picks more than one only past ~16 k tiles, which no test reaches): forced here, with N = 37 tokens
    leaving a masked tail inside the loop, and several batch elements' partial sums to keep apart."""
    import meanflow_fast.kernels.gated_residual as gated_mod
    import meanflow_fast.kernels.layernorm_modulate as ln_mod
    monkeypatch.setattr(ln_mod if name == "ln_modulate" else gated_mod, "steps_per_program", lambda *a, **k: steps)
    op = OPS[name]
    case = op.make((3, 37, 40), torch.float32, True)
    weight = torch.randn(3, 37, 40, dtype=torch.float64, device=DEVICE).float()
    tangents = [t for t in case.tangents if t is not None]
    g = _grads(lambda ins: op.jvp(*ins, *tangents)[0], case.primals, weight)
    g64 = _grads(lambda ins: op.ref(*ins), [_to(p, torch.float64) for p in case.primals], weight)
    g32 = _grads(lambda ins: op.ref(*ins), case.primals, weight)
    for i, (a, t, e) in enumerate(zip(g, g32, g64)):
        assert_within_torch(f"grad {i}", a, t, e, 2, FLOOR[torch.float32])


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
    dh = _strided(_rand(M, N, dtype=dtype), "slice")
    a = _strided(_rand(M, N, dtype=dtype, scale=2.0), "transpose")
    da, h, db = gelu_bwd(dh, a)
    assert da.dtype == h.dtype == dtype and db.dtype == torch.float32 and da.is_contiguous() and h.is_contiguous()
    a64, dh64 = a.double(), dh.double()
    da64 = gelu_tanh_grad(a64) * dh64
    da_t = torch.ops.aten.gelu_backward(dh, a, approximate="tanh")
    for what, got, own, exact in (("da", da, da_t, da64), ("h", h, gelu_tanh(a), gelu_tanh(a64)),
                                  ("db", db, da_t.sum(0), da64.sum(0))):
        assert_within_torch(f"{what} ({dtype}, {shape})", got, own, exact, _factor(dtype), FLOOR[dtype])


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


def test_backward_launch_shapes():
    """The CUDA launch shapes of the row backwards, worked by hand from the rules in their launchers."""
    from meanflow_fast.kernels.layernorm_modulate import _bwd_launch
    assert _bwd_launch(128, 256, 1024, True) == (4, 8)     # DiT-B/2 batch 128: 8192 tiles, 2 per program
    assert _bwd_launch(64, 256, 2048, True) == (2, 8)      # DiT-XL/2 batch 64 (D 1152): 4 tiles of 2 rows
    assert _bwd_launch(1024, 256, 1024, True) == (4, 16)   # 65536 tiles: 4 per program
    assert _bwd_launch(2, 7, 64, False) == (32, 32)        # the interpreter: one 32-row tile
    from meanflow_fast.kernels.mlp import _gelu_bwd_launch
    assert _gelu_bwd_launch(32768, 3072, True) == (8, 32, 256)  # B/2 batch 128: 4096 × 12 tiles, 4 per program
    assert _gelu_bwd_launch(16384, 4608, True) == (8, 32, 256)  # XL/2 batch 64: 2048 × 18 tiles, 4 per program
    assert _gelu_bwd_launch(100, 96, True) == (16, 16, 128)     # small: one step per program
    assert _gelu_bwd_launch(150, 100, False) == (16, 64, 128)   # the interpreter: 64-row programs


def test_steps_per_program():
    from meanflow_fast.kernels.launch import steps_per_program
    assert [steps_per_program(t) for t in (0, 1, 12288, 16384)] == [1, 1, 1, 1]
    assert [steps_per_program(t) for t in (16385, 32768, 32769, 10 ** 7)] == [2, 2, 4, 8]
    assert steps_per_program(100, target_programs=10, max_steps=16) == 16


@pytest.mark.parametrize("name", list(OPS))
def test_backward_saves_nothing_of_the_tangent_stream(name):
    op = OPS[name]
    case = op.make(op.shapes[0], torch.float32, False)
    params = [None if p is None else p.detach().requires_grad_() for p in case.primals]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, y_dot = op.jvp(*params, *[t for t in case.tangents if t is not None])
    tangent_ptrs = {t.untyped_storage().data_ptr() for t in case.tangents if t is not None}
    tangent_ptrs.add(y_dot.untyped_storage().data_ptr())
    assert saved, "expected the primal inputs to be saved"
    assert all(t.untyped_storage().data_ptr() not in tangent_ptrs for t in saved)
    # What each op keeps (DESIGN.md §2): x and W; x, a, W1, W2; x, scale, mean, rstd; gate, f.
    assert len(saved) == {"linear": 2, "mlp": 4, "ln_modulate": 4, "gated_residual": 2}[name]


@pytest.mark.parametrize("impl", ["triton", "cublas", None])
def test_plain_dual_linear_impls(impl):
    """Both implementations of the epilogue-free dual launch (and the device's default) against fp64
    (torch's own matmul stands in for cuBLAS on the CPU)."""
    case = _make_linear(((3, 11), 40, 72), torch.float32, True)
    x, w, b = case.primals
    y, y_dot, pre = dual_linear_fwd(x, w, b, case.tangents[0], impl=impl)
    y64, yd64 = linear_jvp_ref(x.double(), w.double(), b.double(), case.tangents[0].double())
    assert y.shape == y64.shape and y.is_contiguous() and y_dot.is_contiguous() and pre.numel() == 0
    assert rel_err(y, y64) < 1e-5 and rel_err(y_dot, yd64) < 1e-5


def test_mlp_without_grad_skips_the_pre_activation():
    case = _make_mlp(((2, 5), 40, 72), torch.float32, False)
    with torch.no_grad():
        y, y_dot = mlp_jvp(*_jvp_args(case))
    y_ref, yd_ref = mlp_jvp_ref(*_jvp_args(case))
    assert rel_err(y, y_ref) < 1e-5 and rel_err(y_dot, yd_ref) < 1e-5


def test_ln_modulate_eps_and_partial_grads():
    case = _make_ln((2, 33, 72), torch.float32, True)
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


# =================================================================================================
#                                    Loud validation
# =================================================================================================
def _f32(*shape):
    return torch.randn(*shape, device=DEVICE)


def _bad_calls():
    x, w, b = _f32(2, 5, 8), _f32(6, 8), _f32(6)
    w1, b1, w2, b2 = _f32(12, 8), _f32(12), _f32(8, 12), _f32(8)
    s = _f32(2, 8)
    cases = [
        ("linear-fp64", lambda: linear_jvp(x.double(), w.double(), b.double(), x.double()), "supported dtypes"),
        ("linear-int", lambda: linear_jvp(x.long(), w.long(), None, x.long()), "supported dtypes"),
        ("linear-mixed", lambda: linear_jvp(x, w, b, x.half()), "x_dot has dtype torch.float16"),
        ("linear-xdot-shape", lambda: linear_jvp(x, w, b, x[:, :4]), r"x_dot must have shape \(2, 5, 8\)"),
        ("linear-w-1d", lambda: linear_jvp(x, w[0], b, x), "weight must be 2-D"),
        ("linear-k", lambda: linear_jvp(x, _f32(6, 7), b, x), "in_features=7"),
        ("linear-bias", lambda: linear_jvp(x, w, _f32(5), x), r"bias must have shape \(6,\)"),
        ("linear-impl", lambda: dual_linear_fwd(x, w, b, x, impl="cutlass"), r"impl must be one of \('triton'"),
        ("linear-impl-gelu", lambda: dual_linear_fwd(x, w, b, x, gelu=True, impl="cublas"), "no GELU epilogue"),
        ("linear-device", lambda: linear_jvp(x, w, b, torch.empty(2, 5, 8, device="meta")), "is on meta"),
        ("mlp-w2", lambda: mlp_jvp(x, w1, b1, _f32(8, 11), b2, x), r"w2 must have shape \(out_features, 12\)"),
        ("mlp-b1", lambda: mlp_jvp(x, w1, _f32(8), w2, b2, x), r"b1 must have shape \(12,\)"),
        ("mlp-x", lambda: mlp_jvp(_f32(2, 5, 7), w1, b1, w2, b2, _f32(2, 5, 7)), r"x must have shape \(\.\.\., 8\)"),
        ("ln-2d", lambda: ln_modulate_jvp(x[0], s, s, x[0], s, s), "x must be 3-D"),
        ("ln-shift", lambda: ln_modulate_jvp(x, _f32(2, 9), s, x, s, s), r"shift must have shape \(2, 8\)"),
        ("ln-scale-dot", lambda: ln_modulate_jvp(x, s, s, x, s, _f32(3, 8)), r"scale_dot must have shape \(2, 8\)"),
        ("ln-eps", lambda: ln_modulate_jvp(x, s, s, x, s, s, eps=-1.0), "eps must be a non-negative float"),
        ("ln-dtype", lambda: ln_modulate_jvp(x, s.half(), s, x, s, s), "shift has dtype torch.float16"),
        ("gated-gate", lambda: gated_residual_jvp(x, x, x, x, s, x), r"gate must have shape \(2, 8\)"),
        ("gated-f", lambda: gated_residual_jvp(x, s, x[:, :3], x, s, x), r"f must have shape \(2, 5, 8\)"),
        ("gated-fp64", lambda: gated_residual_jvp(*(t.double() for t in (x, s, x, x, s, x))), "supported dtypes"),
    ]
    if not HAS_CUDA:
        cases.append(("linear-bf16-interp", lambda: linear_jvp(*(t.bfloat16() for t in (x, w, b, x))),
                      "bfloat16 is not supported in Triton's CPU interpreter"))
        cases.append(("mlp-bf16-interp", lambda: mlp_jvp(*(t.bfloat16() for t in (x, w1, b1, w2, b2, x))),
                      "bfloat16 is not supported in Triton's CPU interpreter"))
    return cases


@pytest.mark.parametrize("call,match", [pytest.param(c, m, id=i) for i, c, m in _bad_calls()])
def test_invalid_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only: the interpreter switch")
@pytest.mark.parametrize("name", list(OPS))
def test_cpu_without_interpreter_says_so(name, monkeypatch):
    op = OPS[name]
    case = op.make(op.shapes[0], torch.float32, False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        op.jvp(*_jvp_args(case))


# =================================================================================================
#                         torch.library custom ops and torch.compile
# =================================================================================================
def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and AOT dispatch of every launcher op (torch.library.opcheck)."""
    import meanflow_fast.kernels.layernorm_modulate as lnm

    x, xd, w, b = _f32(2, 5, 40), _f32(2, 5, 40), _f32(72, 40), _f32(72)
    mod = _f32(2, 6 * 40)
    sh, sc = mod.chunk(6, 1)[:2]
    _, _, mean, rstd = lnm.ln_modulate_fwd(x, sh, sc, xd, sh, sc, 1e-6)
    ops = torch.ops.meanflow_fast
    for op, args in ((ops.dual_linear_fwd, (x, w, b, xd, True, True)),
                     (ops.dual_linear_fwd, (x, w, None, xd, False, False)),
                     (ops.ln_modulate_fwd, (x, sh, sc, xd, sh, sc, 1e-6)),
                     (ops.ln_modulate_bwd, (xd, x, sc, mean, rstd)),
                     (ops.gated_residual_fwd, (x, sc, xd, xd, sh, x)),
                     (ops.gated_residual_bwd, (xd, sc, x))):
        result = torch.library.opcheck(op.default, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def _block(x, x_dot, mod, mod_dot, w1, b1, w2, b2, wp):
    """A DiT-block-like chain of the four ops (the mod tensors split like adaLN's chunk)."""
    sh, sc, g = mod.chunk(3, dim=1)
    dsh, dsc, dg = mod_dot.chunk(3, dim=1)
    h, h_dot = ln_modulate_jvp(x, sh, sc, x_dot, dsh, dsc, 1e-6)
    h, h_dot = linear_jvp(h, wp, None, h_dot)
    f, f_dot = mlp_jvp(h, w1, b1, w2, b2, h_dot)
    return gated_residual_jvp(x, g, f, x_dot, dg, f_dot)


def _block_inputs(B, N, D, H, dtype):
    def r(*s, scale=1.0):
        return (torch.randn(*s, device=DEVICE) * scale).to(dtype)
    x, xd = r(B, N, D).requires_grad_(), r(B, N, D)
    mod, mod_dot = r(B, 3 * D, scale=0.5).requires_grad_(), r(B, 3 * D, scale=0.5)
    w1, b1 = r(H, D, scale=D ** -0.5).requires_grad_(), r(H).requires_grad_()
    w2, b2 = r(D, H, scale=H ** -0.5).requires_grad_(), r(D).requires_grad_()
    wp = r(D, D, scale=D ** -0.5).requires_grad_()
    return x, xd, mod, mod_dot, w1, b1, w2, b2, wp


def _compare_compiled(backend, B, N, D, H, dtype, tol):
    args = _block_inputs(B, N, D, H, dtype)
    leaves = [a for a in args if a.requires_grad]
    y, y_dot = _block(*args)
    g = torch.autograd.grad(y.float().square().sum(), leaves)
    torch._dynamo.reset()
    compiled = torch.compile(_block, backend=backend, fullgraph=True)
    y_c, yd_c = compiled(*args)
    g_c = torch.autograd.grad(y_c.float().square().sum(), leaves)
    assert not yd_c.requires_grad
    assert rel_err(y_c, y) <= tol and rel_err(yd_c, y_dot) <= tol
    for a, b in zip(g_c, g):
        assert rel_err(a, b) <= tol


def test_eager_calls_go_through_the_custom_ops_and_aot_eager_compiles():
    """On CPU torch.compile cannot trace an interpreted kernel, but it need not: each launch is one
    opaque custom op. aot_eager traces the whole chain (fullgraph) and must equal eager exactly."""
    _compare_compiled("aot_eager", 2, 5, 40, 72, torch.float32, 1e-6)


@requires_cuda
def test_torch_compile_matches_eager_on_gpu():
    _compare_compiled("inductor", 4, 64, 128, 512, torch.bfloat16, 1e-2)


# =================================================================================================
#                         GPU: bf16 at DiT-B/2 shapes against an fp32 reference
# =================================================================================================
def _dit_case(name):
    B, N, D, H = 4, 256, 768, 3072
    return {"linear": lambda: _make_linear(((B, N), D, 3 * D), torch.float32, False),
            "mlp": lambda: _make_mlp(((B, N), D, H), torch.float32, False),
            "ln_modulate": lambda: _make_ln((B, N, D), torch.float32, True),
            "gated_residual": lambda: _make_gated((B, N, D), torch.float32, True)}[name]()


@requires_cuda
@pytest.mark.parametrize("name", list(OPS))
def test_bf16_dit_b2_shapes_on_gpu(name):
    _check_bf16_dit_b2(name)


@requires_cuda
@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_bf16_dual_linear_kernel_on_gpu(name, monkeypatch):
    """The same check with the Triton dual GEMM in the epilogue-free launches (qkv 768→2304; fc2
    3072→768 inside the MLP), which CUDA otherwise sends to cuBLAS (the config switch plain_dual_linear)."""
    with config.override(plain_dual_linear="triton"):
        _check_bf16_dit_b2(name)


def _check_bf16_dit_b2(name):
    """Primal, tangent and gradients of ``name`` in bf16 at DiT-B/2 shapes within 2× the error of torch's
    own bf16 computation, both against an fp32 reference."""
    op = OPS[name]
    case = _dit_case(name)  # fp32 inputs; the bf16 run sees them rounded
    bf = Case([_to(p, torch.bfloat16) for p in case.primals], [_to(t, torch.bfloat16) for t in case.tangents])
    ref_case = Case([_to(p, torch.float32) for p in bf.primals], [_to(t, torch.float32) for t in bf.tangents])
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
    try:
        y32, yd32 = _func_jvp(op, ref_case, torch.float32)
        y_t, yd_t = _func_jvp(op, bf, torch.bfloat16)
        y, y_dot = op.jvp(*_jvp_args(bf))
        for what, got, torch_own, exact in (("primal", y, y_t, y32), ("tangent", y_dot, yd_t, yd32)):
            assert_within_torch(what, got, torch_own, exact, 2, 1e-3)
        weight = torch.randn(y32.shape, device=DEVICE).to(torch.bfloat16)
        tangents = [t for t in bf.tangents if t is not None]
        g = _grads(lambda ins: op.jvp(*ins, *tangents)[0], bf.primals, weight)
        g32 = _grads(lambda ins: op.ref(*ins), ref_case.primals, weight)
        g_t = _grads(lambda ins: op.ref(*ins), bf.primals, weight)
        for i, (a, t, e) in enumerate(zip(g, g_t, g32)):
            assert_within_torch(f"grad {i}", a, t, e, 2, 1e-3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
