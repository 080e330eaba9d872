"""QK-norm + RoPE (kernels/qk_norm_rope.py): ``qk_norm_rope_jvp`` with tangents and ``qk_norm_rope`` of the
plain forward, against fp64 torch.func.jvp / autograd over ``qk_norm_rope_ref`` with the
rule of tests/kernels/cases.py (≤ 2× torch's own error at the input precision + a floor); then the
attention kernel at the iMF shapes (head dim 64, N = 276) fed by it."""
import math
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import meanflow_fast.kernels.qk_norm_rope as qk_mod
from meanflow_fast.kernels.attention import attention_jvp, attention_jvp_ref, attention_ref
from meanflow_fast.kernels.qk_norm_rope import (qk_norm_rope, qk_norm_rope_fwd, qk_norm_rope_jvp, qk_norm_rope_jvp_ref,
                                                qk_norm_rope_ref, rope_cos_sin, rope_ref)
from tests.helpers import HAS_CUDA, assert_within_torch, rel_err, requires_cuda
from tests.kernels.cases import (DEVICE, F64, FLOOR, assert_jvp, assert_opcheck, check_raises_value_error, factor,
                                r64, strided)

# (B, N, H, D): N = 1, 37 and the iMF's 276 tokens; 1 and 3 heads; head dims 32 and 64, and 72 and 6
# (D/2 = 36 and 3 pairs: a masked tail of pairs in the power-of-2 tile).
SHAPES = [(1, 1, 3, 32), (2, 37, 3, 64), (1, 276, 1, 64), (2, 37, 1, 32), (1, 5, 2, 72), (3, 4, 2, 6)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # an elementwise kernel: bf16 runs in the interpreter


def _rand(*shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, dtype=torch.float64, device=DEVICE) * scale + shift).to(dtype)


def make_case(shape, dtype, layout="contig"):
    """Primals (q, k, q_weight, k_weight, cos, sin) and tangents (q̇, k̇). ``layout``: "contig"; "packed":
    q and k views of one (B, N, 2·H·D) projection, q̇ and k̇ stored (B, H, N, D), weights every other
    element, the tables stored transposed."""
    B, N, H, D = shape
    # fp32 tables below fp64, as the iMF model builds them for any model dtype (time_dtype)
    cos, sin = rope_cos_sin(N, D, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=DEVICE)
    q, k = _rand(B, N, H, D, dtype=dtype, scale=2.0, shift=0.3), _rand(B, N, H, D, dtype=dtype)
    q_dot, k_dot = _rand(B, N, H, D, dtype=dtype), _rand(B, N, H, D, dtype=dtype)
    q_w, k_w = _rand(D, dtype=dtype, scale=0.5, shift=1.0), _rand(D, dtype=dtype, scale=0.5, shift=1.0)
    if layout == "packed":
        qk = torch.cat([q.flatten(2), k.flatten(2)], dim=-1)          # (B, N, 2·H·D)
        q, k = (a.unflatten(-1, (H, D)) for a in qk.chunk(2, dim=-1))
        q_dot, k_dot = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q_dot, k_dot))
        q_w, k_w = strided(q_w, "step"), strided(k_w, "step")
        cos, sin = (t.t().contiguous().t() for t in (cos, sin))
        assert not q.is_contiguous() and not q_dot.is_contiguous() and not cos.is_contiguous()
    return [q, k, q_w, k_w, cos, sin], [q_dot, k_dot]


def _to(ts, dtype):
    return [t.detach().to(dtype) for t in ts]


def func_jvp_ref(primals, tangents, dtype):
    """torch.func.jvp of qk_norm_rope_ref in ``dtype`` along (q̇, k̇), weights and tables constant (the
    tables stay fp32 below fp32, as the model keeps them)."""
    q, k, q_w, k_w, cos, sin = _to(primals[:4], dtype) + _to(primals[4:], dtype if dtype == torch.float64
                                                              else torch.float32)
    (qo, ko), (qd, kd) = torch.func.jvp(lambda a, b: qk_norm_rope_ref(a, b, q_w, k_w, cos, sin),
                                        (q, k), tuple(_to(tangents, dtype)))
    return qo, qd, ko, kd


def grads(fn, primals, cotangents):
    """Gradients of Σ q' ⊙ g_q + Σ k' ⊙ g_k with respect to q, k and the two weights (fn returns (q', k'))."""
    leaves = [t.detach().requires_grad_() for t in primals[:4]]
    qo, ko = fn(*leaves, *primals[4:])
    loss = (qo.double() * cotangents[0].double()).sum() + (ko.double() * cotangents[1].double()).sum()
    return torch.autograd.grad(loss, leaves)


def assert_grads(fn, primals, dtype):
    """fn's gradients against autograd through the fp64 reference, within the rule of torch's own."""
    cot = [_rand(*primals[0].shape, dtype=dtype) for _ in range(2)]
    got = grads(fn, primals, cot)
    exact = grads(qk_norm_rope_ref, _to(primals, torch.float64), cot)
    low = grads(qk_norm_rope_ref, primals, cot)
    for name, a, t, e in zip(("dq", "dk", "dq_weight", "dk_weight"), got, low, exact):
        assert a.dtype == dtype and a.shape == e.shape, name
        assert_within_torch(name, a, t, e, factor(dtype), FLOOR[dtype])


# =================================================================================================
#                              With tangents: qk_norm_rope_jvp
# =================================================================================================
def test_jvp_ref_matches_func_jvp():
    primals, tangents = make_case((2, 9, 3, 16), torch.float64)
    got = qk_norm_rope_jvp_ref(*primals, *tangents)
    for a, e in zip(got, func_jvp_ref(primals, tangents, torch.float64)):
        assert rel_err(a, e) <= 1e-12


def _ids(params):
    return [f"{str(d)[6:]}-{s}-{lay}" for d, s, lay in params]


KERNEL_CASES = ([(d, s, "contig") for d in DTYPES[:2] for s in SHAPES]
                + [(d, s, "packed") for d in DTYPES for s in ((2, 37, 3, 64), (1, 5, 2, 72))]
                + [(torch.bfloat16, (1, 276, 1, 64), "contig")])


@pytest.mark.parametrize("dtype,shape,layout", KERNEL_CASES, ids=_ids(KERNEL_CASES))
def test_kernel_matches_reference(dtype, shape, layout):
    """q', q̇', k', k̇' against fp64 torch.func.jvp of the reference (and its explicit _jvp_ref), the
    gradients of q', k' through the kernel's backward against fp64 autograd; the outputs are stored in the
    attention kernels' (B, H, N, D) layout."""
    primals, tangents = make_case(shape, dtype, layout)
    exact = func_jvp_ref(primals, tangents, torch.float64)
    torch_own = func_jvp_ref(primals, tangents, dtype)
    explicit = qk_norm_rope_jvp_ref(*_to(primals, torch.float64), *_to(tangents, torch.float64))
    got = qk_norm_rope_jvp(*primals, *tangents)
    for name, a, t, e, x in zip(("q'", "q'_dot", "k'", "k'_dot"), got, torch_own, exact, explicit):
        assert a.dtype == dtype and a.shape == shape, name
        assert a.transpose(1, 2).is_contiguous(), name
        assert_within_torch(name, a, t, e, factor(dtype), FLOOR[dtype])
        assert rel_err(x, e) <= 1e-12, name
    assert not got[1].requires_grad and not got[3].requires_grad
    assert_grads(lambda *a: qk_norm_rope_jvp(*a, *tangents)[0::2], primals, dtype)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_backward_row_loop(steps, monkeypatch):
    """The backward walks ``steps`` tiles of rows per program (more than one only past ~16 k tiles on a
    GPU): forced here, with a ragged last tile (3·37·3 = 333 rows)."""
    monkeypatch.setattr(qk_mod, "steps_per_program", lambda *a, **k: steps)
    primals, tangents = make_case((3, 37, 3, 32), torch.float32, "packed")
    assert_grads(lambda *a: qk_norm_rope_jvp(*a, *tangents)[0::2], primals, torch.float32)


def test_gradient_of_one_output_and_of_some_inputs():
    """A loss on q' alone (k' gets no gradient: autograd passes None) and only q, k_weight requiring grad."""
    primals, tangents = make_case((2, 7, 3, 32), torch.float32)
    q = primals[0].detach().requires_grad_()
    k_w = primals[3].detach().requires_grad_()
    qo, _, ko, _ = qk_norm_rope_jvp(q, primals[1], primals[2], k_w, *primals[4:], *tangents)
    g = torch.randn_like(qo)
    dq, dkw = torch.autograd.grad((qo * g).sum(), (q, k_w))
    q64 = primals[0].double().requires_grad_()
    qo64, _ = qk_norm_rope_ref(q64, *_to(primals[1:], torch.float64))
    (dq64,) = torch.autograd.grad((qo64 * g.double()).sum(), q64)
    assert rel_err(dq, dq64) < 1e-5
    assert torch.count_nonzero(dkw) == 0  # k' took no part in the loss


def test_backward_saves_nothing_of_the_tangent_stream():
    primals, tangents = make_case((2, 5, 2, 32), torch.float32)
    params = [t.detach().requires_grad_() for t in primals[:4]] + primals[4:]
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = qk_norm_rope_jvp(*params, *tangents)
    tangent_ptrs = {t.untyped_storage().data_ptr() for t in (*tangents, out[1], out[3])}
    assert len(saved) == 6  # q, k, the weights, cos, sin
    assert all(t.untyped_storage().data_ptr() not in tangent_ptrs for t in saved)


def test_eps_is_used():
    primals, tangents = make_case((1, 6, 2, 32), torch.float32)
    primals[0] = primals[0] * 1e-2  # mean(q²) ≈ 1e-4: eps = 1e-2 changes the norm
    got = qk_norm_rope_jvp(*primals, *tangents, eps=1e-2)
    ref = qk_norm_rope_jvp_ref(*_to(primals, torch.float64), *_to(tangents, torch.float64), eps=1e-2)
    default = qk_norm_rope_jvp_ref(*_to(primals, torch.float64), *_to(tangents, torch.float64))
    for a, e in zip(got, ref):
        assert rel_err(a, e) < 1e-5
    assert rel_err(got[0], default[0]) > 1e-2 and rel_err(got[1], default[1]) > 1e-2


def test_custom_ops_pass_opcheck():
    primals, tangents = make_case((2, 5, 2, 32), torch.float32, "packed")
    g = [torch.randn(2, 5, 2, 32) for _ in range(2)]
    ops = torch.ops.meanflow_fast
    assert_opcheck((ops.qk_norm_rope_fwd, (*primals, *tangents, 1e-6)),
                   (ops.qk_norm_rope_primal_fwd, (*primals, 1e-6)),
                   (ops.qk_norm_rope_bwd, (*g, *primals, 1e-6)))


def test_compile_aot_eager_fullgraph():
    """Both public functions trace under torch.compile (fake impls with the (B, H, N, D) storage) without
    graph breaks; outputs and gradients equal eager."""
    primals, tangents = make_case((2, 9, 2, 32), torch.float32)

    def f(q, k, qw, kw):
        qo, ko = qk_norm_rope(q, k, qw, kw, *primals[4:])
        return (qo.transpose(1, 2) * ko.transpose(1, 2)).sum()

    def f_jvp(q, k, qw, kw):
        qo, qd, ko, kd = qk_norm_rope_jvp(q, k, qw, kw, *primals[4:], *tangents)
        return (qo * ko).sum() + (qd * kd).sum().detach()

    torch._dynamo.reset()
    for fn in (f, f_jvp):
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        leaves_e = [t.clone().requires_grad_() for t in primals[:4]]
        leaves_c = [t.clone().requires_grad_() for t in primals[:4]]
        y_e, y_c = fn(*leaves_e), compiled(*leaves_c)
        torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad(y_c, leaves_c), torch.autograd.grad(y_e, leaves_e)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@requires_cuda
def test_bf16_imf_b2_shapes_on_gpu():
    """iMF-B/2 shapes (B 4, N 276, 12 heads of 64) in bf16: primal, tangents and gradients within 2×
    torch's own bf16 error against fp32."""
    primals, tangents = make_case((4, 276, 12, 64), torch.bfloat16, "packed")
    exact = func_jvp_ref(primals, tangents, torch.float32)
    torch_own = func_jvp_ref(primals, tangents, torch.bfloat16)
    for name, a, t, e in zip(("q'", "q'_dot", "k'", "k'_dot"), qk_norm_rope_jvp(*primals, *tangents),
                             torch_own, exact):
        assert_within_torch(name, a, t, e, 2, 1e-3)
    assert_grads(qk_norm_rope, primals, torch.bfloat16)


# =================================================================================================
#                   Primal only (HAS_TANGENT=False): qk_norm_rope of the plain forward
# =================================================================================================
PRIMAL_CASES = [(torch.float32, (2, 37, 3, 64), "packed"), (torch.float16, (1, 276, 1, 64), "contig"),
                (torch.float32, (1, 1, 3, 32), "contig"), (torch.float16, (3, 4, 2, 6), "packed")]


@pytest.mark.parametrize("dtype,shape,layout", PRIMAL_CASES, ids=_ids(PRIMAL_CASES))
def test_primal_kernel_matches_reference(dtype, shape, layout):
    primals, _ = make_case(shape, dtype, layout)
    exact = qk_norm_rope_ref(*_to(primals, torch.float64))
    torch_own = qk_norm_rope_ref(*primals)
    for name, a, t, e in zip(("q'", "k'"), qk_norm_rope(*primals), torch_own, exact):
        assert a.dtype == dtype and a.shape == shape and a.transpose(1, 2).is_contiguous(), name
        assert_within_torch(name, a, t, e, factor(dtype), FLOOR[dtype])
    assert_grads(qk_norm_rope, primals, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_primal_launch_equals_the_primal_stream_of_the_dual_launch(dtype):
    primals, tangents = make_case((2, 11, 3, 32), dtype)
    qo, qd, ko, kd = qk_norm_rope_fwd(*primals)
    qo_d, _, ko_d, _ = qk_norm_rope_fwd(*primals, *tangents)
    assert qd is None and kd is None
    assert torch.equal(qo, qo_d) and torch.equal(ko, ko_d)


def test_primal_saves_six_inputs_and_nothing_without_grad():
    primals, _ = make_case((2, 5, 2, 32), torch.float32)
    params = [t.detach().requires_grad_() for t in primals[:4]] + primals[4:]
    for grad, count in ((True, 6), (False, 0)):
        saved = []

        def pack(t):
            saved.append(t)
            return t
        with torch.set_grad_enabled(grad), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            qo, _ = qk_norm_rope(*params)
        assert len(saved) == count and qo.requires_grad == grad


@pytest.mark.parametrize("weight_tangents", [False, True], ids=["qk", "qk-and-weights"])
def test_func_jvp_over_primal_runs_the_dual_kernel(weight_tangents, monkeypatch):
    """torch.func.jvp over ``qk_norm_rope`` (q, k tangents; weight tangents add rope(n ⊙ ẇ)) against
    torch.func.jvp over the fp64 reference, through the dual op."""
    primals, tangents = make_case((2, 7, 3, 32), torch.float32, "packed")
    n_args = 4 if weight_tangents else 2
    tans = tangents + [torch.randn(32), torch.randn(32)]
    calls = []
    dual = qk_mod.qk_norm_rope_fwd_op
    monkeypatch.setattr(qk_mod, "qk_norm_rope_fwd_op", lambda *a: calls.append(1) or dual(*a))

    def run(fn, dtype):
        prim = _to(primals, dtype)

        def f(*xs):
            return fn(*xs, *prim[n_args:4], *prim[4:])
        return torch.func.jvp(f, tuple(prim[:n_args]), tuple(_to(tans[:n_args], dtype)))

    (qo, ko), (qd, kd) = run(qk_norm_rope, torch.float32)
    (qo64, ko64), (qd64, kd64) = run(qk_norm_rope_ref, torch.float64)
    assert calls
    for a, e in ((qo, qo64), (ko, ko64), (qd, qd64), (kd, kd64)):
        assert rel_err(a, e) <= 1e-5


@pytest.mark.parametrize("fn", ["qk_norm_rope", "qk_norm_rope_jvp"])
def test_func_grad_equals_autograd_and_fp64(fn):
    """torch.func.grad over the kernels (launch.backward_once) equals plain autograd through them and the
    fp64 reference."""
    primals, tangents = make_case((2, 7, 3, 32), torch.float32)
    cot = [torch.randn(2, 7, 3, 32) for _ in range(2)]
    kernel = qk_norm_rope if fn == "qk_norm_rope" else (lambda *a: qk_norm_rope_jvp(*a, *tangents)[0::2])

    def loss(q, k, qw, kw):
        qo, ko = kernel(q, k, qw, kw, *primals[4:])
        return (qo * cot[0]).sum() + (ko * cot[1]).sum()
    got = torch.func.grad(loss, argnums=(0, 1, 2, 3))(*primals[:4])
    leaves = [t.clone().requires_grad_() for t in primals[:4]]
    plain = torch.autograd.grad(loss(*leaves), leaves)
    exact = grads(qk_norm_rope_ref, _to(primals, torch.float64), cot)
    for a, p, e in zip(got, plain, exact):
        assert torch.equal(a, p)
        assert rel_err(a, e) <= 1e-5


# =================================================================================================
#                                    Loud validation
# =================================================================================================
def _bad_calls():
    """(id, call, message) of bad calls of both public functions."""
    q, w = torch.randn(2, 5, 3, 8), torch.randn(8)
    c, s = rope_cos_sin(5, 8)
    q7, w7 = torch.randn(2, 5, 3, 7), torch.randn(7)
    c_grad = c.clone().requires_grad_()
    cases = [
        ("odd-head-dim", lambda: qk_norm_rope(q7, q7, w7, w7, c[:, :3], s[:, :3]), "must be even"),
        ("odd-head-dim-jvp", lambda: qk_norm_rope_jvp(q7, q7, w7, w7, c[:, :3], s[:, :3], q7, q7), "must be even"),
        ("3d", lambda: qk_norm_rope(q[0], q[0], w, w, c, s), r"q must be 4-D \(B, N, H, D\)"),
        ("k-shape", lambda: qk_norm_rope(q, q[:, :, :2], w, w, c, s), r"k must have shape \(2, 5, 3, 8\)"),
        ("weight", lambda: qk_norm_rope(q, q, torch.randn(9), w, c, s), r"q_weight must have shape \(8,\)"),
        ("k-weight", lambda: qk_norm_rope(q, q, w, w[:4], c, s), r"k_weight must have shape \(8,\)"),
        ("cos-tokens", lambda: qk_norm_rope(q, q, w, w, *rope_cos_sin(6, 8)), r"cos must have shape \(5, 4\)"),
        ("cos-width", lambda: qk_norm_rope(q, q, w, w, *rope_cos_sin(5, 16)), r"cos must have shape \(5, 4\)"),
        ("cos-full-width", lambda: qk_norm_rope(q, q, w, w, torch.randn(5, 8), s), r"cos must have shape \(5, 4\)"),
        ("sin-shape", lambda: qk_norm_rope_jvp(q, q, w, w, c, s[:4], q, q), r"sin must have shape \(5, 4\)"),
        ("q-dot-shape", lambda: qk_norm_rope_jvp(q, q, w, w, c, s, q[:1], q), r"q_dot must have shape"),
        ("partial-tangent", lambda: qk_norm_rope_jvp(q, q, w, w, c, s, q, None), "must be given together"),
        ("dtype", lambda: qk_norm_rope(q, q.half(), w, w, c, s), "k has dtype torch.float16"),
        ("fp64", lambda: qk_norm_rope(q.double(), q.double(), w.double(), w.double(), c, s), "supported dtypes"),
        ("table-dtype", lambda: qk_norm_rope(q.half(), q.half(), w.half(), w.half(), c.double(), s.double()),
         "supported dtypes"),
        ("table-half-for-fp32", lambda: qk_norm_rope(q, q, w, w, c.half(), s.half()),
         "cos and sin have dtype torch.float16; allowed: float32"),
        ("tables-differ", lambda: qk_norm_rope(q, q, w, w, c, s.half()), "sin has dtype torch.float16"),
        ("eps", lambda: qk_norm_rope(q, q, w, w, c, s, eps=-1.0), "eps must be a non-negative float"),
        ("table-requires-grad", lambda: qk_norm_rope(q, q, w, w, c_grad, s), "cos and sin are constant tables"),
        ("table-tangent", lambda: torch.func.jvp(lambda c_: qk_norm_rope(q, q, w, w, c_, s), (c,), (c,)),
         "cos and sin are constant tables"),
        ("not-a-tensor", lambda: qk_norm_rope(q, q, w, w, c.tolist(), s), "cos must be a torch.Tensor"),
    ]
    if not HAS_CUDA:
        def without_interpreter():
            with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}):
                qk_norm_rope(q, q, w, w, c, s)
        cases.append(("no-interpreter", without_interpreter, "TRITON_INTERPRET=1"))
    return [pytest.param(call, match, id=i) for i, call, match in cases]


@pytest.mark.parametrize("call,match", _bad_calls())
def test_invalid_inputs_raise_value_error(call, match):
    check_raises_value_error(call, match)


def test_half_tables_are_taken_for_half_inputs():
    """cos/sin in the inputs' dtype are allowed (fp32 is what the model passes)."""
    primals, _ = make_case((1, 6, 2, 32), torch.float16)
    half = primals[:4] + [t.half() for t in primals[4:]]
    exact = qk_norm_rope_ref(*_to(half, torch.float64))
    for a, e, t in zip(qk_norm_rope(*half), exact, qk_norm_rope_ref(*half)):
        assert_within_torch("out", a, t, e, 2, FLOOR[torch.float16])


# =================================================================================================
#            Attention at the iMF shapes (head dim 64, N = 276: ragged in every block size)
# =================================================================================================
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_kernel_at_imf_shapes_fed_by_qk_norm_rope(dtype):
    """QK-norm + RoPE → attention_jvp as IMFAttention.forward_jvp chains them (the (B, N, H, D) outputs
    transposed to (B, H, N, D), contiguous): O, Ȯ and the gradients of q, k, v and the norm weights against
    the fp64 reference chain (qk_norm_rope_jvp_ref, attention_jvp_ref), within 2× torch's own error at
    ``dtype`` + a floor; B = H = 1, N = 276, D = 64."""
    primals, tangents = make_case((1, 276, 1, 64), dtype)
    v, v_dot = _rand(1, 276, 1, 64, dtype=dtype), _rand(1, 276, 1, 64, dtype=dtype)
    cot = _rand(1, 1, 276, 64, dtype=dtype)

    def chain(qk_fn, attn_fn, prims, tans, vv, vd):
        leaves = [t.detach().requires_grad_() for t in prims[:4]] + [vv.detach().requires_grad_()]
        q, q_dot, k, k_dot = qk_fn(*leaves[:4], *prims[4:], *tans)
        if attn_fn is attention_jvp:
            assert q.transpose(1, 2).is_contiguous() and k_dot.transpose(1, 2).is_contiguous()
        o, o_dot = attn_fn(*(a.transpose(1, 2) for a in (q, k, leaves[4], q_dot, k_dot, vd)))
        g = torch.autograd.grad((o.double() * cot.double()).sum(), leaves)
        return (o, o_dot, *g)

    got = chain(qk_norm_rope_jvp, attention_jvp, primals, tangents, v, v_dot)
    exact = chain(qk_norm_rope_jvp_ref, attention_jvp_ref, _to(primals, torch.float64),
                  _to(tangents, torch.float64), v.double(), v_dot.double())
    torch_own = chain(qk_norm_rope_jvp_ref, attention_jvp_ref, primals, tangents, v, v_dot)
    for name, a, t, e in zip(("O", "O_dot", "dq", "dk", "dq_weight", "dk_weight", "dv"), got, torch_own, exact):
        assert a.dtype == dtype and a.shape == e.shape, name
        assert_within_torch(name, a, t, e, factor(dtype), FLOOR[dtype])


def test_attention_kernel_alone_at_n276_d64():
    """attention_jvp alone at (B, H, N, D) = (1, 1, 276, 64), fp32: O and Ȯ against torch.func.jvp of
    attention_ref and attention_jvp_ref in fp64, gradients against fp64 autograd."""
    q, k, v, q_dot, k_dot, v_dot, g = (torch.randn(1, 1, 276, 64, device=DEVICE) for _ in range(7))
    o64, od64 = torch.func.jvp(attention_ref, (q.double(), k.double(), v.double()),
                               (q_dot.double(), k_dot.double(), v_dot.double()))
    ref = attention_jvp_ref(*(t.double() for t in (q, k, v, q_dot, k_dot, v_dot)))
    assert rel_err(ref[0], o64) < 1e-12 and rel_err(ref[1], od64) < 1e-12
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, o_dot = attention_jvp(*leaves, q_dot, k_dot, v_dot)
    assert rel_err(o, o64) < 1e-5 and rel_err(o_dot, od64) < 1e-5
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    exact = torch.autograd.grad(attention_ref(*leaves64), leaves64, g.double())
    for a, e in zip(torch.autograd.grad(o, leaves, g), exact):
        assert rel_err(a, e) < 1e-5


# ---------------------------------------------------------------------------------------------------- references
# The pure-torch references themselves: each primal against an independent computation (torch's own op or the
# formula written out), each explicit tangent rule against torch.func.jvp of its primal, in fp64 at odd shapes;
# tangents carry no graph, primals stay differentiable.
REF_SHAPES = [(2, 7, 3, 10), (1, 33, 2, 64), (3, 5, 1, 6)]  # (B, N, H, D_h)


def test_rope_cos_sin_by_hand():
    cos, sin = rope_cos_sin(5, 6, theta=100.0, dtype=F64)
    assert cos.shape == sin.shape == (5, 3)
    for n in range(5):
        for i in range(3):
            angle = n * 100.0 ** (-2 * i / 6)
            assert cos[n, i].item() == pytest.approx(math.cos(angle), abs=1e-15)
            assert sin[n, i].item() == pytest.approx(math.sin(angle), abs=1e-15)
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope_cos_sin(5, 7)


@pytest.mark.parametrize("shape", SHAPES)
def test_rope_is_complex_rotation_of_adjacent_pairs(shape):
    B, N, H, D = shape
    x = r64(*shape)
    cos, sin = rope_cos_sin(N, D, dtype=F64)
    xc = torch.view_as_complex(x.reshape(B, N, H, D // 2, 2))
    expect = torch.view_as_real(xc * torch.complex(cos, sin)[None, :, None, :]).reshape(shape)
    assert rel_err(rope_ref(x, cos, sin), expect) <= 1e-15
    # position 0 is the identity
    assert torch.equal(rope_ref(x, cos, sin)[:, 0], x[:, 0])




@pytest.mark.parametrize("shape", REF_SHAPES)
def test_qk_norm_rope_primal(shape):
    B, N, H, D = shape
    q, k, wq, wk = r64(*shape), r64(*shape), r64(D), r64(D)
    cos, sin = rope_cos_sin(N, D, dtype=F64)
    q2, k2 = qk_norm_rope_ref(q, k, wq, wk, cos, sin, 1e-6)
    assert rel_err(q2, rope_ref(F.rms_norm(q, (D,), wq, 1e-6), cos, sin)) <= 1e-14
    assert rel_err(k2, rope_ref(F.rms_norm(k, (D,), wk, 1e-6), cos, sin)) <= 1e-14


@pytest.mark.parametrize("shape", REF_SHAPES)
def test_qk_norm_rope_jvp_matches_func_jvp(shape):
    B, N, H, D = shape
    q, k, wq, wk, qd, kd = r64(*shape), r64(*shape), r64(D), r64(D), r64(*shape), r64(*shape)
    cos, sin = rope_cos_sin(N, D, dtype=F64)
    (q_ref, k_ref), (qd_ref, kd_ref) = torch.func.jvp(
        lambda q_, k_: qk_norm_rope_ref(q_, k_, wq, wk, cos, sin, 1e-6), (q, k), (qd, kd))
    assert_jvp(qk_norm_rope_jvp_ref(q, k, wq, wk, cos, sin, qd, kd, 1e-6), (q_ref, qd_ref, k_ref, kd_ref))




def test_qk_norm_rope_jvp_ref_primals_are_differentiable_like_the_plain_ref():
    """Gradients through the rule's primals equal those through the plain ``qk_norm_rope_ref``."""
    B, N, H, D = 2, 5, 3, 8
    cos, sin = rope_cos_sin(N, D, dtype=F64)
    q, k, wq, wk = (r64(*s).requires_grad_() for s in ((B, N, H, D), (B, N, H, D), (D,), (D,)))
    dot = r64(B, N, H, D)
    weight = r64(B, N, H, D)
    q1, _, k1, _ = qk_norm_rope_jvp_ref(q, k, wq, wk, cos, sin, dot, dot)
    q2, k2 = qk_norm_rope_ref(q, k, wq, wk, cos, sin)
    g1 = torch.autograd.grad(((q1 + 2 * k1) * weight).sum(), (q, k, wq, wk))
    g2 = torch.autograd.grad(((q2 + 2 * k2) * weight).sum(), (q, k, wq, wk))
    for a, b in zip(g1, g2):
        assert rel_err(a, b) <= 1e-14
