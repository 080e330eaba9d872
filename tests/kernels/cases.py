"""Op cases shared by the kernel test files: inputs, references, and the checks every op goes through.

On a machine without CUDA the kernels run in Triton's interpreter (tests/conftest.py), at small odd
shapes (rows 7 and 33, D = 72 and 40, hidden 96 and 100), in fp32 and fp16 (and bf16 for the
elementwise kernels: the interpreter's bf16 tl.dot is broken, triton issue #11584). With CUDA the same
checks run on the GPU, bf16 included, plus DiT-B/2-sized bf16 checks.

Tolerances follow flash-attention's rule: the kernel's relative error against an fp64 reference must be
≤ 2 × the error of torch itself at the same precision (the ``_ref`` run in that dtype) + a small floor.
"""
import contextlib
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence
from unittest import mock

import pytest
import torch

from meanflow_fast.kernels.attention import (attention, attention_jvp, attention_jvp_qkv, attention_jvp_qkv_ref,
                                             attention_jvp_ref, attention_ref)
from meanflow_fast.kernels.gated_residual import (gated_residual, gated_residual_jvp, gated_residual_jvp_ref,
                                                  gated_residual_ref)
from meanflow_fast.kernels.gated_residual_ln import (gated_residual_ln, gated_residual_ln_jvp,
                                                     gated_residual_ln_jvp_ref, gated_residual_ln_ref)
from meanflow_fast.kernels.layernorm_modulate import ln_modulate, ln_modulate_jvp, ln_modulate_jvp_ref, ln_modulate_ref
from meanflow_fast.kernels.linear import linear_jvp, linear_jvp_ref, linear_ref
from meanflow_fast.kernels.mlp import mlp, mlp_jvp, mlp_jvp_ref, mlp_ref
from tests.helpers import HAS_CUDA, assert_within_torch, rel_err, requires_cuda

DEVICE = "cuda" if HAS_CUDA else "cpu"
# Floor added to 2× torch's error, in ‖·‖-relative error: ~1/4 of the unit roundoff of each dtype
# (fp32 6e-8, fp16 4.9e-4, bf16 3.9e-3), well below the errors measured here (≈ 0.4–1 roundoff).
FLOOR = {torch.float32: 1e-8, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def factor(dtype) -> float:
    """The 2× rule, doubled for bf16 in the interpreter: its fp32 → bf16 conversion truncates instead
    of rounding to nearest (checked on N(0, 1) values: mean |error| 2.3e-3 vs 1.1e-3 for torch), so
    every bf16 store there carries twice torch's rounding error. CUDA rounds to nearest: 2×."""
    return 4.0 if (dtype == torch.bfloat16 and not HAS_CUDA) else 2.0


# =================================================================================================
#                              Op table: inputs, references, kernels
# =================================================================================================
def strided(t: torch.Tensor, how: str) -> torch.Tensor:
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
    primal: Optional[Callable] = None  # the primal-only function of the plain forward, if the op has one


def rand(*shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, dtype=torch.float64, device=DEVICE) * scale + shift).to(dtype)


def f32(*shape):
    return torch.randn(*shape, device=DEVICE)


def make_linear(shape, dtype, is_strided):
    lead, k, n = shape
    x, xd = rand(*lead, k, dtype=dtype), rand(*lead, k, dtype=dtype)
    w, b = rand(n, k, dtype=dtype, scale=k ** -0.5), rand(n, dtype=dtype)
    if is_strided:
        x, xd, w, b = strided(x, "slice"), strided(xd, "transpose"), strided(w, "transpose"), strided(b, "step")
    return Case([x, w, b], [xd, None, None])


def make_mlp(shape, dtype, is_strided):
    lead, d, h = shape
    x, xd = rand(*lead, d, dtype=dtype), rand(*lead, d, dtype=dtype)
    w1, b1 = rand(h, d, dtype=dtype, scale=2 * d ** -0.5), rand(h, dtype=dtype, scale=0.5)
    w2, b2 = rand(d, h, dtype=dtype, scale=h ** -0.5), rand(d, dtype=dtype)
    if is_strided:
        x, xd = strided(x, "slice"), strided(xd, "transpose")
        w1, w2 = strided(w1, "transpose"), strided(w2, "slice")
    return Case([x, w1, b1, w2, b2], [xd, None, None, None, None])


def modulation(b, d, dtype, k, is_strided):
    """k (B, D) tensors; strided: the chunks of one (B, 6D) tensor, as DiTBlock's adaLN produces them."""
    if is_strided:
        return list(rand(b, 6 * d, dtype=dtype).chunk(6, dim=1)[:k])
    return [rand(b, d, dtype=dtype) for _ in range(k)]


def make_ln(shape, dtype, is_strided):
    b, n, d = shape
    x, xd = rand(b, n, d, dtype=dtype, scale=2.0, shift=0.5), rand(b, n, d, dtype=dtype)
    shift, scale = modulation(b, d, dtype, 2, is_strided)
    shift_d, scale_d = modulation(b, d, dtype, 2, is_strided)
    if is_strided:
        x, xd = strided(x, "slice"), strided(xd, "transpose")
    return Case([x, shift, scale], [xd, shift_d, scale_d])


def make_gated(shape, dtype, is_strided):
    b, n, d = shape
    x, f, xd, fd = (rand(b, n, d, dtype=dtype) for _ in range(4))
    (g,), (gd,) = modulation(b, d, dtype, 1, is_strided), modulation(b, d, dtype, 1, is_strided)
    if is_strided:
        x, f, xd, fd = strided(x, "slice"), strided(f, "transpose"), strided(xd, "transpose"), strided(fd, "slice")
    return Case([x, g, f], [xd, gd, fd])


OPS = {
    "linear": Op("linear", linear_ref, linear_jvp, linear_jvp_ref,
                 [((7,), 72, 40), ((3, 11), 40, 72)], make_linear, True),
    "mlp": Op("mlp", mlp_ref, mlp_jvp, mlp_jvp_ref,
              [((1, 7), 72, 96), ((3, 11), 40, 100)], make_mlp, True, mlp),
    "ln_modulate": Op("ln_modulate", ln_modulate_ref, ln_modulate_jvp, ln_modulate_jvp_ref,
                      [(1, 7, 72), (3, 11, 40)], make_ln, False, ln_modulate),
    "gated_residual": Op("gated_residual", gated_residual_ref, gated_residual_jvp, gated_residual_jvp_ref,
                         [(1, 7, 72), (3, 11, 40)], make_gated, False, gated_residual),
}


def jvp_args(case: Case):
    """The `_jvp` / `_jvp_ref` argument list: the primals, then the tangents of the non-constant ones."""
    return list(case.primals) + [t for t in case.tangents if t is not None]


def to(t, dtype):
    return None if t is None else t.detach().to(dtype)


def func_jvp(op: Op, case: Case, dtype):
    """torch.func.jvp over op.ref with every input cast to dtype (constants get zero tangents)."""
    primals = [to(p, dtype) for p in case.primals]
    tangents = [(to(t, dtype) if t is not None else (None if p is None else torch.zeros_like(p)))
                for p, t in zip(primals, case.tangents)]
    keep = [i for i, p in enumerate(primals) if p is not None]

    def f(*args):
        full = list(primals)
        for i, a in zip(keep, args):
            full[i] = a
        return op.ref(*full)

    return torch.func.jvp(f, tuple(primals[i] for i in keep), tuple(tangents[i] for i in keep))


def grads(fn, inputs, weight):
    """Gradients of the random loss Σ fn(inputs) ⊙ weight with respect to every non-None input."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]  # keeps the strides
    out = fn(leaves)
    params = [t for t in leaves if t is not None]
    return torch.autograd.grad((out.double() * weight.double()).sum(), params)


def assert_grads_within_torch(kernel_fn, ref, primals, weight, exact_dtype=torch.float64, rule=None):
    """Gradients of Σ kernel_fn(inputs) ⊙ weight (kernel_fn takes the list of inputs) against autograd
    through ``ref`` at ``exact_dtype``, within ``rule`` = (factor, floor) times torch's own error: autograd
    through ``ref`` at the inputs' precision. The default rule is ``factor`` and FLOOR of that dtype."""
    dtype = next(p.dtype for p in primals if p is not None)
    fac, floor = rule if rule is not None else (factor(dtype), FLOOR[dtype])
    g = grads(kernel_fn, primals, weight)
    g_exact = grads(lambda ins: ref(*ins), [to(p, exact_dtype) for p in primals], weight)
    g_t = grads(lambda ins: ref(*ins), primals, weight)
    names = [f"arg{i}" for i, p in enumerate(primals) if p is not None]
    for nm, a, t, e in zip(names, g, g_t, g_exact):
        assert a.dtype == dtype and a.shape == e.shape, nm
        assert_within_torch(f"grad {nm}", a, t, e, fac, floor)


def kernel_cases(name):
    """(dtype, shape, strided) parameters of op ``name``: fp32 and fp16 (bf16 too on CUDA, and for the
    elementwise kernels in the interpreter) × its shapes × contiguous / strided."""
    op = OPS[name]
    dtypes = [torch.float32, torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float32, torch.float16]
    if not op.matmul and not HAS_CUDA:
        dtypes.append(torch.bfloat16)  # elementwise kernels: the interpreter handles bf16 loads/stores
    return [pytest.param(dtype, shape, is_strided,
                         id=f"{str(dtype)[6:]}-{shape}-{'strided' if is_strided else 'contig'}")
            for dtype in dtypes for shape in op.shapes for is_strided in (False, True)]


def dit_case(name):
    """fp32 inputs of op ``name`` at DiT-B/2 shapes: B = 4, N = 256, D = 768, hidden 3072."""
    B, N, D, H = 4, 256, 768, 3072
    return {"linear": lambda: make_linear(((B, N), D, 3 * D), torch.float32, False),
            "mlp": lambda: make_mlp(((B, N), D, H), torch.float32, False),
            "ln_modulate": lambda: make_ln((B, N, D), torch.float32, True),
            "gated_residual": lambda: make_gated((B, N, D), torch.float32, True)}[name]()


def assert_opcheck(*calls):
    """torch.library.opcheck (schema, fake implementation, AOT dispatch) of each (op, args) pair."""
    for op, args in calls:
        result = torch.library.opcheck(op.default, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


@contextlib.contextmanager
def fp32_matmuls():
    """A block with TF32 off: a true fp32 reference on the GPU."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


# =================================================================================================
#                 Dual kernels (primal + tangent): the checks every op of OPS goes through
# =================================================================================================
def check_jvp_ref_matches_func_jvp(name):
    """The op's ``_jvp_ref`` against torch.func.jvp over its ``_ref`` in fp64."""
    op = OPS[name]
    case = op.make(op.shapes[1], torch.float64, False)
    y_ref, yd_ref = func_jvp(op, case, torch.float64)
    y, y_dot = op.jvp_ref(*jvp_args(case))
    assert rel_err(y, y_ref) <= 1e-10 and rel_err(y_dot, yd_ref) <= 1e-10
    assert not y_dot.requires_grad


def check_kernel_matches_reference(name, dtype, shape, is_strided):
    """Primal, tangent and the gradients of a random loss on y (through the kernel's backward) against
    fp64, within 2× torch's own error at ``dtype`` + FLOOR."""
    op = OPS[name]
    case = op.make(shape, dtype, is_strided)
    y64, yd64 = func_jvp(op, case, torch.float64)
    y_t, yd_t = func_jvp(op, case, dtype)  # torch's own error at this precision

    y, y_dot = op.jvp(*jvp_args(case))
    assert y.dtype == dtype and y_dot.dtype == dtype and y.shape == y64.shape and y_dot.shape == yd64.shape
    assert not y_dot.requires_grad and y_dot.grad_fn is None
    for what, got, torch_own, exact in (("primal", y, y_t, y64), ("tangent", y_dot, yd_t, yd64)):
        assert_within_torch(what, got, torch_own, exact, factor(dtype), FLOOR[dtype])

    weight = torch.randn(y64.shape, dtype=torch.float64, device=DEVICE).to(dtype)
    tangents = [t for t in case.tangents if t is not None]
    assert_grads_within_torch(lambda ins: op.jvp(*ins, *tangents)[0], op.ref, case.primals, weight)


def check_backward_token_loop(name):
    """Gradients at N = 37 tokens (a masked tail inside the backward's token loop) and three batch
    elements whose partial sums must stay apart; the caller forces the number of steps per program."""
    op = OPS[name]
    case = op.make((3, 37, 40), torch.float32, True)
    weight = torch.randn(3, 37, 40, dtype=torch.float64, device=DEVICE).float()
    tangents = [t for t in case.tangents if t is not None]
    assert_grads_within_torch(lambda ins: op.jvp(*ins, *tangents)[0], op.ref, case.primals, weight,
                              rule=(2, FLOOR[torch.float32]))


def check_backward_saves_nothing_of_the_tangent_stream(name, expected):
    """The dual Function saves ``expected`` tensors for backward, none of them of the tangent stream."""
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
    assert len(saved) == expected


def no_interpreter_calls(name):
    """Bad calls (id, call, message) for CPU tensors with TRITON_INTERPRET=0: op ``name``'s jvp and, if it
    has one, its primal function must refuse and say how to run the kernels."""
    op = OPS[name]
    case = op.make(op.shapes[0], torch.float32, False)

    def without_interpreter(fn, args):
        def call():
            with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}):
                fn(*args)
        return call
    calls = [("no-interpreter", without_interpreter(op.jvp, jvp_args(case)), "TRITON_INTERPRET=1")]
    if op.primal is not None:
        calls.append(("primal-no-interpreter", without_interpreter(op.primal, case.primals), "TRITON_INTERPRET=1"))
    return calls


def check_bf16_dit_b2(name):
    """Primal, tangent and gradients of ``name`` in bf16 at DiT-B/2 shapes within 2× the error of torch's
    own bf16 computation, both against an fp32 reference."""
    op = OPS[name]
    case = dit_case(name)  # fp32 inputs; the bf16 run sees them rounded
    bf = Case([to(p, torch.bfloat16) for p in case.primals], [to(t, torch.bfloat16) for t in case.tangents])
    ref_case = Case([to(p, torch.float32) for p in bf.primals], [to(t, torch.float32) for t in bf.tangents])
    with fp32_matmuls():
        y32, yd32 = func_jvp(op, ref_case, torch.float32)
        y_t, yd_t = func_jvp(op, bf, torch.bfloat16)
        y, y_dot = op.jvp(*jvp_args(bf))
        for what, got, torch_own, exact in (("primal", y, y_t, y32), ("tangent", y_dot, yd_t, yd32)):
            assert_within_torch(what, got, torch_own, exact, 2, 1e-3)
        weight = torch.randn(y32.shape, device=DEVICE).to(torch.bfloat16)
        tangents = [t for t in bf.tangents if t is not None]
        assert_grads_within_torch(lambda ins: op.jvp(*ins, *tangents)[0], op.ref, bf.primals, weight,
                                  torch.float32, (2, 1e-3))


# =================================================================================================
#          Primal-only kernels (the dual kernels with HAS_TANGENT=False, the plain forward's)
# =================================================================================================
def check_primal_kernel_matches_reference(name, dtype, shape, is_strided):
    """Output and gradients of the primal function against fp64, within 2× torch's own error + FLOOR."""
    op = OPS[name]
    case = op.make(shape, dtype, is_strided)
    y64 = op.ref(*[to(p, torch.float64) for p in case.primals])
    y_t = op.ref(*case.primals)  # torch's own error at this precision
    y = op.primal(*case.primals)
    assert y.dtype == dtype and y.shape == y64.shape
    assert_within_torch("output", y, y_t, y64, factor(dtype), FLOOR[dtype])

    weight = torch.randn(y64.shape, dtype=torch.float64, device=DEVICE).to(dtype)
    assert_grads_within_torch(lambda ins: op.primal(*ins), op.ref, case.primals, weight)


def check_primal_saves(name, expected):
    """The primal Function keeps what the dual one keeps (``expected`` tensors), and nothing without grad."""
    op = OPS[name]
    case = op.make(op.shapes[0], torch.float32, False)
    params = [None if p is None else p.detach().requires_grad_() for p in case.primals]
    for grad, count in ((True, expected), (False, 0)):
        saved = []

        def pack(t):
            saved.append(t)
            return t
        with torch.set_grad_enabled(grad), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = op.primal(*params)
        assert len(saved) == count and y.requires_grad == grad


def check_primal_bf16_dit_b2(name):
    """Output and gradients of the primal function in bf16 at DiT-B/2 shapes within 2× torch's own bf16
    error, against an fp32 reference."""
    op = OPS[name]
    case = dit_case(name)  # fp32 inputs; the bf16 run sees them rounded
    bf = [to(p, torch.bfloat16) for p in case.primals]
    with fp32_matmuls():
        y32, y_t, y = op.ref(*[to(p, torch.float32) for p in bf]), op.ref(*bf), op.primal(*bf)
        assert_within_torch("output", y, y_t, y32, 2, 1e-3)
        weight = torch.randn(y32.shape, device=DEVICE).to(torch.bfloat16)
        assert_grads_within_torch(lambda ins: op.primal(*ins), op.ref, bf, weight, torch.float32, (2, 1e-3))


def check_func_jvp_over_primal(name, weight_tangents=False):
    """torch.func.jvp over the primal function against torch.func.jvp over the fp64 reference, fp32.
    Every non-None input gets a tangent, but the weights of a matmul op only with ``weight_tangents``
    (its jvp then takes the explicit rule in torch)."""
    op = OPS[name]
    case = op.make(op.shapes[1], torch.float32, True)
    tangents = [None if p is None else (t if t is not None else torch.randn_like(p))
                for p, t in zip(case.primals, case.tangents)]
    if op.matmul and not weight_tangents:
        tangents = [tangents[0]] + [None] * (len(tangents) - 1)
    idx = [i for i, t in enumerate(tangents) if t is not None]

    def call(fn, dtype):
        prim = [to(p, dtype) for p in case.primals]

        def f(*xs):
            args = list(prim)
            for i, x in zip(idx, xs):
                args[i] = x
            return fn(*args)
        return torch.func.jvp(f, tuple(prim[i] for i in idx), tuple(to(tangents[i], dtype) for i in idx))

    y, y_dot = call(op.primal, torch.float32)
    y64, y_dot64 = call(op.ref, torch.float64)
    assert rel_err(y, y64) <= 1e-5 and rel_err(y_dot, y_dot64) <= 1e-5, (rel_err(y, y64), rel_err(y_dot, y_dot64))


# =================================================================================================
#            Reverse mode under torch.func (launch.backward_once): every public kernel function
# =================================================================================================
B, N, D, HEADS, HID = 2, 7, 40, 2, 72  # attention: head dim 32 (a supported one), 9 tokens


def _drawer(dtype, seed):
    """Random tensors from a fixed seed in fp64, cast to dtype: the same values for the kernel (fp32) and
    the reference (fp64) run."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64, device=DEVICE, generator=gen) * scale).to(dtype)
    return draw


# Which outputs of each function are differentiable: the first of a ``*_jvp`` pair (the tangent carries
# no graph), both of the fused residual + LN's (y, m), y and m of its jvp form (y, ẏ, m, ṁ).
OUTPUTS = {"gated_residual_ln": (0, 1), "gated_residual_ln_jvp": (0, 2)}


def differentiable(name: str, f: Callable) -> Callable:
    """f returning the list of its differentiable outputs (OUTPUTS; the first one by default)."""
    def out(*args) -> List[torch.Tensor]:
        res = f(*args)
        return [res] if torch.is_tensor(res) else [res[i] for i in OUTPUTS.get(name, (0,))]
    return out


def func_cases(dtype=torch.float64, seed=0):
    """name → (kernel fn, reference fn, inputs) for every public kernel function: both fns take the
    inputs to differentiate and return the list of differentiable outputs; tangents are fixed random
    constants. All in ``dtype``."""
    _r = _drawer(dtype, seed)
    x, f = _r(B, N, D), _r(B, N, D)
    g, sh, sc = _r(B, D), _r(B, D), _r(B, D)
    w1, b1, w2, b2 = _r(HID, D, scale=D ** -0.5), _r(HID), _r(D, HID, scale=HID ** -0.5), _r(D)
    q, k, v = (_r(B, HEADS, N + 2, 32) for _ in range(3))
    qkv = _r(B, N + 2, 3 * HEADS * 32)
    xd, fd, gd, shd, scd, qd, kd, vd, qkvd = (_r(*t.shape) for t in (x, f, g, sh, sc, q, k, v, qkv))
    return {
        "attention": (attention, attention_ref, [q, k, v]),
        "attention_jvp": (lambda q_, k_, v_: attention_jvp(q_, k_, v_, qd, kd, vd),
                          lambda q_, k_, v_: attention_jvp_ref(q_, k_, v_, qd, kd, vd), [q, k, v]),
        "attention_jvp_qkv": (lambda a: attention_jvp_qkv(a, qkvd, HEADS),
                              lambda a: attention_jvp_qkv_ref(a, qkvd, HEADS), [qkv]),
        "mlp": (mlp, mlp_ref, [x, w1, b1, w2, b2]),
        "mlp_jvp": (lambda *a: mlp_jvp(*a, xd), lambda *a: mlp_jvp_ref(*a, xd), [x, w1, b1, w2, b2]),
        "linear_jvp": (lambda a, w, b: linear_jvp(a, w, b, xd), lambda a, w, b: linear_jvp_ref(a, w, b, xd),
                       [x, w2[:, :D].contiguous(), b2]),
        "ln_modulate": (ln_modulate, ln_modulate_ref, [x, sh, sc]),
        "ln_modulate_jvp": (lambda *a: ln_modulate_jvp(*a, xd, shd, scd),
                            lambda *a: ln_modulate_jvp_ref(*a, xd, shd, scd), [x, sh, sc]),
        "gated_residual": (gated_residual, gated_residual_ref, [x, g, f]),
        "gated_residual_jvp": (lambda *a: gated_residual_jvp(*a, xd, gd, fd),
                               lambda *a: gated_residual_jvp_ref(*a, xd, gd, fd), [x, g, f]),
        "gated_residual_ln": (gated_residual_ln, gated_residual_ln_ref, [x, g, f, sh, sc]),
        "gated_residual_ln_jvp": (lambda *a: gated_residual_ln_jvp(*a, xd, gd, fd, shd, scd),
                                  lambda *a: gated_residual_ln_jvp_ref(*a, xd, gd, fd, shd, scd),
                                  [x, g, f, sh, sc]),
    }


def weighted_loss(name, fn, weights):
    """Σ_outputs Σ (output ⊙ weight): a loss whose gradient is a vector-Jacobian product with random
    cotangents."""
    def loss(*inputs):
        return sum((o * w).sum() for o, w in zip(differentiable(name, fn)(*inputs), weights))
    return loss


def _three_grads(name: str, dtype, seed: int = 0):
    """Per input of case ``name`` in ``dtype``: (torch.func.grad, plain autograd through the same kernels,
    autograd of the fp64 reference) of one random-cotangent loss."""
    fn, _, inputs = func_cases(dtype, seed)[name]
    _, ref, inputs64 = func_cases(torch.float64, seed)[name]
    weights = [torch.randn_like(o) for o in differentiable(name, ref)(*inputs64)]
    loss = weighted_loss(name, fn, [w.to(dtype) for w in weights])
    got = torch.func.grad(loss, argnums=tuple(range(len(inputs))))(*inputs)
    leaves = [t.clone().requires_grad_() for t in inputs]
    plain = torch.autograd.grad(loss(*leaves), leaves)
    leaves64 = [t.clone().requires_grad_() for t in inputs64]
    exact = torch.autograd.grad(weighted_loss(name, ref, weights)(*leaves64), leaves64)
    return list(zip(got, plain, exact))


def check_func_grad(name, seed):
    """torch.func.grad equals plain autograd through the same kernels, and the fp64 reference (fp32)."""
    for i, (a, p, e) in enumerate(_three_grads(name, torch.float32, seed)):
        assert torch.equal(a, p), f"{name}: input {i}: torch.func.grad differs from autograd"
        assert rel_err(a, e) <= 1e-5, f"{name}: input {i}: rel err {rel_err(a, e):.3g} against fp64"


def check_func_grad_bf16(name):
    """On CUDA in bf16 (autograd's device threads, the autotuned kernels): torch.func.grad gives what plain
    autograd gives through the same kernels (deterministic: no atomics; 1e-3 leaves room for a cuBLAS
    heuristic), and stays near the fp64 reference (bf16: ~1e-2)."""
    for i, (a, p, e) in enumerate(_three_grads(name, torch.bfloat16)):
        assert rel_err(a, p) <= 1e-3, f"{name}: input {i}: torch.func.grad differs from autograd"
        assert rel_err(a, e) <= 3e-2, f"{name}: input {i}: rel err {rel_err(a, e):.3g} against fp64"


def check_func_vjp_called_after_the_transform(name):
    """torch.func.vjp's vjp_fn runs the backward after the transform has ended, on saved tensors that
    are wrappers of a finished level (the kernels must take the op path there)."""
    fn, _, inputs = func_cases(torch.float32)[name]
    _, ref, inputs64 = func_cases(torch.float64)[name]
    outs, vjp_fn = torch.func.vjp(differentiable(name, fn), *inputs)
    cots = [torch.randn_like(o) for o in outs]
    got = vjp_fn(cots)
    leaves = [t.clone().requires_grad_() for t in inputs64]
    exact = torch.autograd.grad(differentiable(name, ref)(*leaves), leaves, [c.double() for c in cots])
    for i, (a, e) in enumerate(zip(got, exact)):
        assert rel_err(a, e) <= 1e-5, f"{name}: input {i}: rel err {rel_err(a, e):.3g} against fp64"


def check_second_transform_level_refuses(name):
    """A grad of a grad, a jvp of a grad and a vjp_fn called inside a grad would differentiate the
    kernels' backward: NotImplementedError, never a silent zero."""
    fn, _, (x, *rest) = func_cases(torch.float32)[name]

    def first(x_):
        return weighted_loss(name, fn, [torch.ones_like(o) for o in differentiable(name, fn)(x_, *rest)])(x_, *rest)

    def vjp_inside(x_):
        outs, vjp_fn = torch.func.vjp(lambda a: differentiable(name, fn)(a, *rest), x_)
        return vjp_fn([torch.ones_like(o) for o in outs])[0].square().sum()

    for second in (lambda: torch.func.grad(lambda x_: torch.func.grad(first)(x_).square().sum())(x),
                   lambda: torch.func.jvp(torch.func.grad(first), (x,), (torch.randn_like(x),)),
                   lambda: torch.func.grad(vjp_inside)(x)):
        # (the *_jvp Functions have no forward-mode rule of their own: under a jvp of a grad torch stops
        # them first, with its own error)
        with pytest.raises((NotImplementedError, RuntimeError), match="not differentiable|implement the jvp"):
            second()


def torch_func_cases(grad=(), grad_bf16_gpu=(), vjp_after=(), second_level=()):
    """One op file's reverse-mode checks under torch.func, as ``(check, name)`` parameters of a single
    test; every check is called ``check(name, seed)``."""
    def params(kind, names, check, marks=()):
        return [pytest.param(check, n, id=f"{kind}-{n}", marks=marks) for n in names]
    return (params("grad", grad, check_func_grad)
            + params("grad-bf16-gpu", grad_bf16_gpu, lambda n, _: check_func_grad_bf16(n), requires_cuda)
            + params("vjp-after", vjp_after, lambda n, _: check_func_vjp_called_after_the_transform(n))
            + params("second-level", second_level, lambda n, _: check_second_transform_level_refuses(n)))


def bad_call_params(name, calls):
    """``(call, match)`` parameters of op ``name``'s bad calls (id, call, message), with the calls without
    the interpreter added on a machine without CUDA."""
    if not HAS_CUDA:
        calls = calls + no_interpreter_calls(name)
    return [pytest.param(call, match, id=i) for i, call, match in calls]


def check_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------------- references
F64 = torch.float64


def r64(*shape):
    """A fresh fp64 standard-normal tensor (the references' tests run in fp64)."""
    return torch.randn(*shape, dtype=F64)


def assert_jvp(out, ref, tol=1e-12):
    """``out`` = (primal, tangent, ...) of an explicit rule against torch.func.jvp's ``ref``; the tangents
    carry no autograd graph."""
    for got, want in zip(out, ref):
        assert rel_err(got, want) <= tol
    for tangent in out[1::2]:
        assert not tangent.requires_grad and tangent.grad_fn is None
