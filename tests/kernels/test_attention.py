"""Attention with its tangent and the primal backward (kernels/attention.py).

Every kernel output (O, Ȯ, dQ, dK, dV) is compared with a high-precision reference (fp64 on CPU, fp32 on a
GPU): torch.func.jvp and autograd over `attention_ref`. The tolerance follows flash-attention's rule:
the kernel's max abs error ≤ 2 × torch's own max abs error at the input precision (plain softmax(QKᵀ)V
in that dtype, `_torch_attention`) + a small atol. On CPU the kernels run in Triton's interpreter
(tests/conftest.py), at small shapes; bf16 and the large shapes run on a GPU only (the interpreter's bf16
tl.dot is wrong, triton issue #11584).
"""
import math

import pytest
import torch

import meanflow_fast.kernels.attention as attn_mod
from meanflow_fast.kernels.attention import (
    attention,
    attention_jvp,
    attention_jvp_ref,
    attention_ref,
)
from tests.helpers import HAS_CUDA, OpLog, requires_cuda
from tests.kernels.cases import torch_func_cases

DEVICE = "cuda" if HAS_CUDA else "cpu"

# atol added to 2 × torch's error. At N = 1 torch's error is exactly 0 (P = 1, O = V, dQ = dK = 0) and
# atol alone bounds the kernel's (observed on CPU up to 7e-7 fp32, 2e-6 fp16, for dQ and dK); elsewhere
# it is small beside 2 × torch's error (observed on CPU over the grid below: torch fp32 2e-7–1.1e-6,
# fp16 6e-4–3.4e-3; the kernel's error at most 1.7× torch's, mostly below 1×).
ATOL = {torch.float32: 2e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def _torch_attention(q, k, v, scale=None):
    """softmax(s·QKᵀ)·V computed in the input dtype, no upcast: torch's own error at that precision."""
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.softmax((q @ k.transpose(-1, -2)) * s, dim=-1) @ v


def _inputs(B, H, N, D, dtype, device=DEVICE, key_offset=0.0):
    """Fresh N(0, 1) primals, tangents and an output cotangent. ``key_offset`` adds a per-head vector shared
    by all keys (as real attention keys have), which gives Ṡ a large row-constant part."""
    q, k, v, q_dot, k_dot, v_dot, g = (torch.randn(B, H, N, D, device=device) for _ in range(7))
    if key_offset:
        k = k + key_offset * torch.randn(1, H, 1, D, device=device)
    return [t.to(dtype) for t in (q, k, v, q_dot, k_dot, v_dot, g)]


def _jvp_and_grads(fn, q, k, v, q_dot, k_dot, v_dot, g, dtype=None):
    """(O, Ȯ, dQ, dK, dV) of ``fn`` by torch.func.jvp and autograd, with every input cast to ``dtype``."""
    cast = (lambda t: t.detach().to(dtype)) if dtype is not None else (lambda t: t.detach())
    prim = [cast(t) for t in (q, k, v)]
    o, o_dot = torch.func.jvp(fn, tuple(prim), tuple(cast(t) for t in (q_dot, k_dot, v_dot)))
    prim = [t.requires_grad_() for t in prim]
    grads = torch.autograd.grad(fn(*prim), prim, cast(g))
    return (o, o_dot, *grads)


def _kernel_outputs(q, k, v, q_dot, k_dot, v_dot, g, scale=None):
    prim = [t.detach().requires_grad_() for t in (q, k, v)]
    o, o_dot = attention_jvp(*prim, q_dot, k_dot, v_dot, scale)
    return (o, o_dot, *torch.autograd.grad(o, prim, g))


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


NAMES = ("O", "O_dot", "dQ", "dK", "dV")


def _check_against_torch(xs, ref_dtype, scale=None):
    """Kernel vs reference, bounded by 2 × torch's error at the input precision + atol. Returns the errors."""
    dtype = xs[0].dtype
    ref = _jvp_and_grads(lambda q, k, v: attention_ref(q, k, v, scale), *xs, dtype=ref_dtype)
    low = _jvp_and_grads(lambda q, k, v: _torch_attention(q, k, v, scale), *xs)
    ours = _kernel_outputs(*xs, scale=scale)
    errors = {}
    for name, a, t, r in zip(NAMES, ours, low, ref):
        assert a.dtype == dtype and a.shape == r.shape, name
        assert torch.isfinite(a).all(), name
        err, err_torch = _max_err(a, r), _max_err(t, r)
        errors[name] = (err, err_torch)
        assert err <= 2 * err_torch + ATOL[dtype], (
            f"{name}: kernel error {err:.3e} > 2 × torch {dtype} error {err_torch:.3e} + {ATOL[dtype]:.0e}")
    return errors


# ---------------------------------------------------------------------------------------------
# The pure-torch references
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 3, 17, 16), (1, 2, 64, 72)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_jvp_ref_matches_func_jvp_fp64(shape, scale):
    xs = [torch.randn(*shape, dtype=torch.float64) for _ in range(6)]
    o, o_dot = attention_jvp_ref(*xs, scale=scale)
    o_ref, o_dot_ref = torch.func.jvp(lambda q, k, v: attention_ref(q, k, v, scale), tuple(xs[:3]),
                                      tuple(xs[3:]))
    assert _max_err(o, o_ref) <= 1e-10
    assert _max_err(o_dot, o_dot_ref) <= 1e-10


# ---------------------------------------------------------------------------------------------
# Kernels vs reference (interpreter on CPU; also runs on a GPU)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("D", [32, 64, 72])
@pytest.mark.parametrize("N", [1, 7, 33, 64, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_attention_jvp_and_grads(dtype, N, D):
    _check_against_torch(_inputs(2, 2, N, D, dtype), torch.float64)


@pytest.mark.parametrize("D", [96, 128])
def test_wide_head_dims(D):
    _check_against_torch(_inputs(1, 2, 20, D, torch.float32), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_explicit_scale(dtype):
    _check_against_torch(_inputs(1, 2, 33, 64, dtype), torch.float64, scale=0.37)


@pytest.mark.parametrize("N", [1, 7, 40])
def test_keys_with_shared_offset_fp16(N):
    """Keys sharing a large per-head vector make Ṡ's row-constant part s·q̇·k̄ dominate. The kernel takes
    the first key block's P-weighted mean of Ṡ off before rounding P̃ ⊙ Ṡ; without that shift its Ȯ
    error was ~2× larger here (1.7e-3 vs 6.8e-4 at N = 100) and non-zero at N = 1 where torch's is 0."""
    _check_against_torch(_inputs(2, 2, N, 64, torch.float16, key_offset=4.0), torch.float64)


def test_func_jvp_over_attention_runs_the_fused_kernel():
    q, k, v, q_dot, k_dot, v_dot, g = _inputs(2, 2, 33, 72, torch.float32)
    o, o_dot = torch.func.jvp(attention, (q, k, v), (q_dot, k_dot, v_dot))
    o_f, o_dot_f = attention_jvp(q, k, v, q_dot, k_dot, v_dot)
    assert torch.equal(o, o_f) and torch.equal(o_dot, o_dot_f)

    # torch.autograd.forward_ad takes the same path
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        out = attention(*(fwAD.make_dual(p, t) for p, t in ((q, q_dot), (k, k_dot), (v, v_dot))))
        o_ad, o_dot_ad = fwAD.unpack_dual(out)
    assert torch.equal(o_ad, o_f) and torch.equal(o_dot_ad, o_dot_f)

    # a tangent left out (None in the Function's jvp) is a constant input: zeros
    _, o_dot_q = torch.func.jvp(lambda a: attention(a, k, v), (q,), (q_dot,))
    _, o_dot_z = attention_jvp(q, k, v, q_dot, torch.zeros_like(k), torch.zeros_like(v))
    assert torch.equal(o_dot_q, o_dot_z)

    # reverse mode through attention() uses the same backward as attention_jvp
    prim = [t.clone().requires_grad_() for t in (q, k, v)]
    grads = torch.autograd.grad(attention(*prim), prim, g)
    assert all(torch.equal(a, b) for a, b in zip(grads, _kernel_outputs(q, k, v, q_dot, k_dot, v_dot, g)[2:]))


def test_o_dot_has_no_graph():
    q, k, v, q_dot, k_dot, v_dot, _ = _inputs(1, 2, 7, 32, torch.float32)
    q.requires_grad_()
    o, o_dot = attention_jvp(q, k, v, q_dot, k_dot, v_dot)
    assert o.requires_grad and not o_dot.requires_grad and o_dot.grad_fn is None


def test_non_contiguous_views_from_qkv():
    """q, k, v cut from a (B, N, 3, H, D) projection as meanflow_fast/model.py does (strided, no copy), and
    a view with a non-unit stride on D (copied by the launcher): same results as contiguous inputs."""
    B, N, H, D = 2, 33, 2, 72
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE)
    qkv_dot = torch.randn(B, N, 3, H, D, device=DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q_dot, k_dot, v_dot = qkv_dot.permute(2, 0, 3, 1, 4).unbind(0)
    v_dot = torch.randn(B, H, N, 2 * D, device=DEVICE)[..., ::2]  # stride 2 on D
    assert not q.is_contiguous() and v_dot.stride(-1) == 2
    g = torch.randn(B, H, N, D, device=DEVICE).transpose(1, 2).contiguous().transpose(1, 2)
    strided = _kernel_outputs(q, k, v, q_dot, k_dot, v_dot, g)
    dense = _kernel_outputs(*(t.contiguous() for t in (q, k, v, q_dot, k_dot, v_dot, g)))
    for name, a, b in zip(NAMES, strided, dense):
        assert torch.equal(a, b), name
    # the output is stored (B, N, H, D): the DiT's head merge is a view
    o = strided[0]
    assert o.transpose(1, 2).is_contiguous()


def test_stride_align_worked_by_hand():
    """ALIGN, the largest power of 2 ≤ 8 dividing every (B, H, N) stride, which the kernels pass to the
    compiler (``_aligned``): the DiT's packed qkv at D 72 (head stride 72, row stride 3·H·72), contiguous
    tensors, and rows padded to 73, 74 and 76 elements."""
    align = attn_mod._stride_align
    qkv = torch.empty(2, 5, 3, 4, 72)
    assert align(*qkv.permute(2, 0, 3, 1, 4).unbind(0)) == 8
    assert align(torch.empty(2, 3, 5, 72), torch.empty(2, 3, 5, 64)) == 8
    for width, expected in ((73, 1), (74, 2), (76, 4), (80, 8)):
        assert align(torch.empty(2, 3, 5, 64), torch.empty(2, 3, 5, width)[..., :72]) == expected, width


@pytest.mark.parametrize("width", [73, 74, 76])
def test_row_strides_not_a_multiple_of_8(width):
    """Rows padded to ``width`` elements (row and head strides not multiples of 8: ALIGN 1, 2, 4): the
    kernels must not assume more alignment than there is. Same outputs and gradients as contiguous
    inputs; a launcher that passed ALIGN = 8 would read every row but the first from the wrong place."""
    B, H, N, D = 2, 2, 33, 72
    padded = [torch.randn(B, H, N, width, device=DEVICE)[..., :D] for _ in range(7)]
    assert attn_mod._stride_align(*padded) == math.gcd(8, width)
    strided = _kernel_outputs(*padded)
    dense = _kernel_outputs(*(t.contiguous() for t in padded))
    for name, a, b in zip(NAMES, strided, dense):  # (a GPU may tune another tile for another ALIGN)
        assert _max_err(a, b) <= 1e-5 * b.abs().max().item(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_packed_qkv_against_fp64_reference(dtype):
    """attention_jvp_qkv on the DiT's packed (B, N, 3·H·D) projection: O, Ȯ by torch.func.jvp and the
    packed gradient by autograd over attention_ref in fp64 (on split views of one packed tensor), within
    2 × torch's own error at the input precision + atol, as the unpacked kernel."""
    B, N, H, D = 2, 33, 3, 72
    qkv, qkv_dot = (torch.randn(B, N, 3 * H * D, device=DEVICE) for _ in range(2))
    g = torch.randn(B, H, N, D, device=DEVICE)

    def outputs(fn, dt):
        x, x_dot = qkv.to(dt), qkv_dot.to(dt)
        o, o_dot = torch.func.jvp(lambda t: fn(*attn_mod.split_qkv(t, H)), (x,), (x_dot,))
        x = x.clone().requires_grad_()
        return o, o_dot, torch.autograd.grad(fn(*attn_mod.split_qkv(x, H)), x, g.to(dt))[0]

    ref = outputs(attention_ref, torch.float64)
    low = outputs(_torch_attention, dtype)
    x = qkv.to(dtype).requires_grad_()
    o, o_dot = attn_mod.attention_jvp_qkv(x, qkv_dot.to(dtype), H)
    ours = (o, o_dot, torch.autograd.grad(o, x, g.to(dtype))[0])
    for name, a, t, r in zip(("O", "O_dot", "dQKV"), ours, low, ref):
        assert a.dtype == dtype and a.shape == r.shape, name
        err, err_torch = _max_err(a, r), _max_err(t, r)
        assert err <= 2 * err_torch + ATOL[dtype], f"{name}: {err:.3e} > 2 × {err_torch:.3e} + {ATOL[dtype]:.0e}"
    assert o_dot.grad_fn is None and o.transpose(1, 2).is_contiguous()


def test_packed_qkv_backward_writes_one_buffer():
    """The packed path's backward is the kernels plus views: no stack of dQ, dK, dV and no copy of the
    packed gradient (which unbinding q, k, v in autograd costs: a stack, then a contiguous copy), and no
    zero-filled gradients for Ȯ or the LSE. Top-level ops of the backward, logged by a dispatch mode."""
    B, N, H, D = 2, 17, 2, 32
    qkv = torch.randn(B, N, 3 * H * D, device=DEVICE, requires_grad=True)
    qkv_dot = torch.randn(B, N, 3 * H * D, device=DEVICE)

    def backward_ops(o):
        with OpLog() as log:
            o.transpose(1, 2).reshape(B, N, H * D).sum().backward()  # the DiT's head merge, then a loss
        return log.ops

    packed = backward_ops(attn_mod.attention_jvp_qkv(qkv, qkv_dot, H)[0])
    assert "meanflow_fast.attn_bwd_qkv" in packed
    heavy = {"aten.stack", "aten.clone", "aten.copy_", "aten.cat", "aten.zeros", "aten.zeros_like",
             "aten.fill_", "aten.new_zeros"}
    assert not heavy & set(packed), packed
    # the unpacked path through autograd views does pay a stack + copy: the check above can fail
    unpacked = backward_ops(attention_jvp(*attn_mod.split_qkv(qkv, H), *attn_mod.split_qkv(qkv_dot, H))[0])
    assert heavy & set(unpacked), unpacked


def test_packed_qkv_value_errors():
    x = torch.randn(2, 5, 3 * 2 * 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"qkv must be \(B, N, 3·num_heads·D\)"):
        attn_mod.attention_jvp_qkv(x[..., :-1], x[..., :-1], 2)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        attn_mod.attention_jvp_qkv(x, x, 0)
    with pytest.raises(ValueError, match="qkv_dot must be"):
        attn_mod.attention_jvp_qkv(x, x[0], 2)
    with pytest.raises(ValueError, match="head dim D = 40"):
        attn_mod.attention_jvp_qkv(torch.randn(2, 5, 3 * 3 * 40, device=DEVICE),
                                   torch.randn(2, 5, 3 * 3 * 40, device=DEVICE), 3)


# ---------------------------------------------------------------------------------------------
# Custom ops and torch.compile
# ---------------------------------------------------------------------------------------------
def test_custom_ops_registered_and_eager():
    ops = torch.ops.meanflow_fast
    q, k, v, q_dot, k_dot, v_dot, g = _inputs(1, 1, 17, 32, torch.float32)
    s = 1.0 / math.sqrt(32)
    o, lse = ops.attn_fwd(q, k, v, s)
    o2, o_dot, lse2 = ops.attn_fwd_jvp(q, k, v, q_dot, k_dot, v_dot, s)
    assert torch.equal(o, o2) and torch.equal(lse, lse2) and lse.dtype == torch.float32
    assert torch.equal(o_dot, attention_jvp(q, k, v, q_dot, k_dot, v_dot)[1])
    lse_ref = torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) * s, dim=-1)
    assert _max_err(lse, lse_ref) <= 1e-5
    dq, dk, dv = ops.attn_bwd(g, q, k, v, o, lse, s)
    prim = [t.clone().requires_grad_() for t in (q, k, v)]
    for a, b in zip((dq, dk, dv), torch.autograd.grad(attention(*prim), prim, g)):
        assert torch.equal(a, b)
    # the ops' own autograd (register_autograd): reverse mode through attn_fwd, LSE/Ȯ non-differentiable
    qg = q.clone().requires_grad_()
    o3, lse3 = ops.attn_fwd(qg, k, v, s)
    assert not lse3.requires_grad
    assert torch.equal(torch.autograd.grad(o3, qg, g)[0], dq)
    _, o_dot3, _ = ops.attn_fwd_jvp(qg, k, v, q_dot, k_dot, v_dot, s)
    assert not o_dot3.requires_grad


def test_custom_ops_opcheck():
    """Schema, fake (meta) implementations, autograd registration and AOT dispatch of the four ops."""
    q, k, v, q_dot, k_dot, v_dot, g = _inputs(1, 1, 9, 32, torch.float32)
    ops = torch.ops.meanflow_fast
    o, lse = ops.attn_fwd(q, k, v, 0.2)
    for op, args in ((ops.attn_fwd, (q.requires_grad_(), k, v, 0.2)),
                     (ops.attn_fwd_jvp, (q, k, v, q_dot, k_dot, v_dot, 0.2)),
                     (ops.attn_bwd, (g, q.detach(), k, v, o, lse, 0.2)),
                     (ops.attn_bwd_qkv, (g, q.detach(), k, v, o, lse, 0.2))):
        torch.library.opcheck(op, args)
    dqkv = ops.attn_bwd_qkv(g, q.detach(), k, v, o, lse, 0.2)
    assert dqkv.shape == (1, 9, 3, 1, 32) and dqkv.is_contiguous()
    for i, ref in enumerate(ops.attn_bwd(g, q.detach(), k, v, o, lse, 0.2)):
        assert torch.equal(dqkv[:, :, i].transpose(1, 2), ref)


def _compile_check(backend):
    B, N, H, D = 2, 40, 2, 64
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE, dtype=dtype)
    q_dot, k_dot, v_dot = (torch.randn(B, H, N, D, device=DEVICE, dtype=dtype) for _ in range(3))

    def f(qkv):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = attention(q, k, v)
        return (o.transpose(1, 2).reshape(B, N, H * D).float() ** 2).sum()

    def f_jvp(qkv):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o, o_dot = attention_jvp(q, k, v, q_dot, k_dot, v_dot)
        return (o.float() * o_dot.float()).sum(), o_dot

    qkv_dot = torch.stack([q_dot, k_dot, v_dot]).permute(1, 3, 0, 2, 4).reshape(B, N, 3 * H * D)

    def f_jvp_packed(qkv):
        o, o_dot = attn_mod.attention_jvp_qkv(qkv.reshape(B, N, 3 * H * D), qkv_dot, H)
        return (o.float() * o_dot.float()).sum(), o_dot

    torch._dynamo.reset()
    for fn in (f, f_jvp, f_jvp_packed):
        compiled = torch.compile(fn, backend=backend, fullgraph=True)
        x_e, x_c = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
        y_e, y_c = fn(x_e), compiled(x_c)
        if fn is not f:
            assert torch.equal(y_e[1], y_c[1])
            y_e, y_c = y_e[0], y_c[0]
        torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
        g_e, = torch.autograd.grad(y_e, x_e)
        g_c, = torch.autograd.grad(y_c, x_c)
        torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-5)


def test_compile_aot_eager_fullgraph():
    """The custom ops trace under torch.compile (fake impls, register_autograd) without graph breaks."""
    _compile_check("aot_eager")


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def test_value_errors(monkeypatch):
    q, k, v, q_dot, k_dot, v_dot, _ = _inputs(1, 2, 8, 32, torch.float32)
    cases = [
        (lambda: attention(q.double(), k.double(), v.double()), "dtype torch.float64"),
        (lambda: attention(q.long(), k, v), "supported: float32, float16, bfloat16"),
        (lambda: attention(q, k.half(), v), "k has dtype torch.float16 but q has torch.float32"),
        (lambda: attention(q, k[:, :, :5], v), "k has shape (1, 2, 5, 32)"),
        (lambda: attention(q[0], k[0], v[0]), "q must be 4-D (B, H, N, D)"),
        (lambda: attention(q, k, v.to("meta")), "v is on meta but q is on"),
        (lambda: attention(*(torch.randn(1, 2, 8, 48, device=DEVICE) for _ in range(3))), "head dim D = 48"),
        (lambda: attention(q[:, :, :0], k[:, :, :0], v[:, :, :0]), "B, H and N must be at least 1"),
        (lambda: attention(*(torch.empty(1, 65536, 1, 32, device=DEVICE) for _ in range(3))), "B·H = 65536"),
        (lambda: attention(q, k, v, scale=0.0), "scale must be finite and non-zero"),
        (lambda: attention(q, k, v, scale="big"), "scale must be a real number"),
        (lambda: attention(q, [1], v), "k must be a torch.Tensor"),
        (lambda: attention_jvp(q, k, v, q_dot[..., :16], k_dot, v_dot), "q_dot has shape"),
        (lambda: attention_jvp(q, k, v, q_dot, k_dot.half(), v_dot), "k_dot has dtype"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
            fn()
    # CPU tensors are rejected unless Triton's interpreter is on
    monkeypatch.setattr(attn_mod, "_INTERPRET", False)
    cpu = [t.cpu() for t in (q, k, v)]
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        attention(*cpu)


def test_layout_is_stated_in_docstrings_and_shape_errors():
    """The kernels and the references read (B, H, N, D) (batch, heads, tokens, head dim), which the shape
    of a (B, N, H, D) tensor cannot contradict: every public docstring and every shape error says it."""
    for fn in (attention, attention_jvp, attn_mod.attention_jvp_qkv, attention_ref, attention_jvp_ref,
               attn_mod.attention_jvp_qkv_ref, attn_mod.split_qkv, attn_mod.attention_fwd, attn_mod.attention_bwd):
        assert "(B, H, N, D)" in fn.__doc__, fn.__name__
    q, k, v, q_dot, k_dot, v_dot, g = _inputs(1, 2, 8, 32, torch.float32)
    lse = torch.zeros(1, 2, 8, device=DEVICE)
    bad = {
        "3-D": lambda: attention(q[0], k[0], v[0]),
        "shapes differ": lambda: attention(q, k[:, :, :5], v),
        "tangent shape": lambda: attention_jvp(q, k, v, q_dot[..., :16], k_dot, v_dot),
        "head dim": lambda: attention(*(torch.randn(1, 2, 8, 48, device=DEVICE) for _ in range(3))),
        "N = 0": lambda: attention(q[:, :, :0], k[:, :, :0], v[:, :, :0]),
        # 65 536 tokens of 1 head read as 65 536 heads: the grid's limit names the layout
        "B·H": lambda: attention(*(torch.empty(1, 65536, 1, 32, device=DEVICE) for _ in range(3))),
        "out": lambda: attn_mod.attention_bwd(g, q, k, v, q, lse, out=(q[:, :1], k, v)),
        "ref 3-D": lambda: attention_ref(q[0], k[0], v[0]),
        "ref tangent shape": lambda: attention_jvp_ref(q, k, v, q_dot[:, :1], k_dot, v_dot),
    }
    for what, call in bad.items():
        with pytest.raises(ValueError, match=r"\(B, H, N, D\)"):
            call()
            pytest.fail(f"{what}: no error")
    with pytest.raises(ValueError, match=r"lse must be float32 of shape \(B, H, N\) = \(1, 2, 8\)"):
        attn_mod.attention_bwd(g, q, k, v, q, lse[:, :, :7])


def test_references_check_the_layout():
    """The references take any dtype and head dim (fp64, D = 8 here) but four dims each, alike in shape,
    dtype and device: before, a 3-D call or a head-broadcast key ran silently and a mismatched tangent
    was a raw matmul error."""
    q, k, v, q_dot, k_dot, v_dot = (torch.randn(2, 3, 5, 8, dtype=torch.float64) for _ in range(6))
    o = attention_ref(q, k, v)
    p = torch.softmax(torch.einsum("bhnd,bhmd->bhnm", q, k) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(o, torch.einsum("bhnm,bhmd->bhnd", p, v))
    with pytest.raises(ValueError, match=r"q must be 4-D \(B, H, N, D\) .*, got 3-D with shape \(3, 5, 8\)"):
        attention_ref(q[0], k[0], v[0])
    with pytest.raises(ValueError, match=r"k has shape \(2, 1, 5, 8\) but q has \(2, 3, 5, 8\)"):
        attention_ref(q, k[:, :1], v)
    with pytest.raises(ValueError, match=r"v_dot has shape \(2, 3, 4, 8\)"):
        attention_jvp_ref(q, k, v, q_dot, k_dot, v_dot[:, :, :4])
    with pytest.raises(ValueError, match="k_dot has dtype torch.float32 but q has torch.float64"):
        attention_jvp_ref(q, k, v, q_dot, k_dot.float(), v_dot)


# ---------------------------------------------------------------------------------------------
# Reverse mode under torch.func
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("check,name", torch_func_cases(
    grad=["attention", "attention_jvp", "attention_jvp_qkv"],
    grad_bf16_gpu=["attention_jvp_qkv"],
    vjp_after=["attention"],
    second_level=["attention"]))
def test_reverse_mode_under_torch_func(check, name, seed):
    check(name, seed)


# ---------------------------------------------------------------------------------------------
# GPU only: bf16, realistic sizes, torch.compile with inductor
# ---------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("N,D", [(256, 64), (256, 72), (1024, 64), (1024, 72), (257, 96), (255, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_low_precision(dtype, N, D):
    _check_against_torch(_inputs(2, 4, N, D, dtype), torch.float32)


@requires_cuda
def test_gpu_fp32_uses_ieee_dots():
    # TF32 dots would be ~1e-3 off; IEEE fp32 stays within 2 × torch's fp32 error (TF32 off by default).
    _check_against_torch(_inputs(2, 4, 256, 64, torch.float32), torch.float64)


@requires_cuda
def test_gpu_compile_inductor():
    _compile_check("inductor")


def test_forward_mode_tangents_are_checked():
    """torch.func.jvp over ``attention`` checks its tangents as ``attention_jvp`` does."""
    q, k, v = _inputs(1, 2, 8, 32, torch.float32)[:3]
    with pytest.raises(ValueError, match="k_dot has dtype torch.float16 but q has torch.float32"):
        torch.func.jvp(lambda k_: attention(q, k_, v), (k,), (k.half(),))


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's bf16 dots; on CUDA bf16 is supported")
def test_bf16_in_the_interpreter_is_refused():
    q, k, v = _inputs(1, 2, 8, 32, torch.bfloat16)[:3]
    with pytest.raises(ValueError, match="bfloat16 is not supported in Triton's CPU interpreter"):
        attention(q, k, v)
