"""The iMF ops' pure-torch references (kernels/imf_reference.py): each primal against an independent
computation (torch's own op or the formula written out), each explicit tangent rule against
torch.func.jvp of the primal, in fp64 at odd shapes; tangents carry no graph, primals stay
differentiable."""
import math

import pytest
import torch
import torch.nn.functional as F

from meanflow_fast.kernels.imf_reference import (channel_gated_residual_jvp_ref, channel_gated_residual_ref,
                                                 qk_norm_rope_jvp_ref, qk_norm_rope_ref, rms_norm_jvp_ref,
                                                 rms_norm_ref, rope_cos_sin, rope_ref, swiglu_jvp_ref, swiglu_ref)
from tests.helpers import rel_err

F64 = torch.float64
SHAPES = [(2, 7, 3, 10), (1, 33, 2, 64), (3, 5, 1, 6)]  # (B, N, H, D_h)


def r64(*shape):
    return torch.randn(*shape, dtype=F64)


def assert_jvp(out, ref, tol=1e-12):
    """``out`` = (primal, tangent, ...) of an explicit rule against torch.func.jvp's ``ref``."""
    for got, want in zip(out, ref):
        assert rel_err(got, want) <= tol
    for tangent in out[1::2]:
        assert not tangent.requires_grad and tangent.grad_fn is None


# ------------------------------------------------------------------------------------------ RMSNorm
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


# ------------------------------------------------------------------------------------------ RoPE
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


# ------------------------------------------------------------------------------------------ QK-norm + RoPE
@pytest.mark.parametrize("shape", SHAPES)
def test_qk_norm_rope_primal(shape):
    B, N, H, D = shape
    q, k, wq, wk = r64(*shape), r64(*shape), r64(D), r64(D)
    cos, sin = rope_cos_sin(N, D, dtype=F64)
    q2, k2 = qk_norm_rope_ref(q, k, wq, wk, cos, sin, 1e-6)
    assert rel_err(q2, rope_ref(F.rms_norm(q, (D,), wq, 1e-6), cos, sin)) <= 1e-14
    assert rel_err(k2, rope_ref(F.rms_norm(k, (D,), wk, 1e-6), cos, sin)) <= 1e-14


@pytest.mark.parametrize("shape", SHAPES)
def test_qk_norm_rope_jvp_matches_func_jvp(shape):
    B, N, H, D = shape
    q, k, wq, wk, qd, kd = r64(*shape), r64(*shape), r64(D), r64(D), r64(*shape), r64(*shape)
    cos, sin = rope_cos_sin(N, D, dtype=F64)
    (q_ref, k_ref), (qd_ref, kd_ref) = torch.func.jvp(
        lambda q_, k_: qk_norm_rope_ref(q_, k_, wq, wk, cos, sin, 1e-6), (q, k), (qd, kd))
    assert_jvp(qk_norm_rope_jvp_ref(q, k, wq, wk, cos, sin, qd, kd, 1e-6), (q_ref, qd_ref, k_ref, kd_ref))


# ------------------------------------------------------------------------------------------ SwiGLU
@pytest.mark.parametrize("rows,D,hidden", [((2, 7), 40, 106), ((1, 33), 24, 64), ((3,), 9, 5)])
def test_swiglu_primal_and_jvp(rows, D, hidden):
    x, x_dot = r64(*rows, D), r64(*rows, D)
    w1, w3, w2 = r64(hidden, D) / D ** 0.5, r64(hidden, D) / D ** 0.5, r64(D, hidden) / hidden ** 0.5
    a, b = x @ w1.T, x @ w3.T
    assert rel_err(swiglu_ref(x, w1, w3, w2), (a / (1 + torch.exp(-a)) * b) @ w2.T) <= 1e-14
    ref = torch.func.jvp(lambda x_: swiglu_ref(x_, w1, w3, w2), (x,), (x_dot,))
    assert_jvp(swiglu_jvp_ref(x, w1, w3, w2, x_dot), ref)


# ------------------------------------------------------------------------------------------ gated residual
def test_channel_gated_residual_primal_and_jvp():
    x, f, g, xd, fd = r64(2, 7, 40), r64(2, 7, 40), r64(40), r64(2, 7, 40), r64(2, 7, 40)
    assert torch.equal(channel_gated_residual_ref(x, g, f), x + g[None, None, :] * f)
    ref = torch.func.jvp(lambda x_, f_: channel_gated_residual_ref(x_, g, f_), (x, f), (xd, fd))
    assert_jvp(channel_gated_residual_jvp_ref(x, g, f, xd, fd), ref)


# ------------------------------------------------------------------------------------------ autograd
def test_primals_are_differentiable_like_the_plain_refs():
    """Gradients through each rule's primal equal those through the plain ``_ref``."""
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
    x = r64(3, 8).requires_grad_()
    w1, w3, w2 = (r64(*s).requires_grad_() for s in ((5, 8), (5, 8), (8, 5)))
    g1 = torch.autograd.grad(swiglu_jvp_ref(x, w1, w3, w2, r64(3, 8))[0].sum(), (x, w1, w3, w2))
    g2 = torch.autograd.grad(swiglu_ref(x, w1, w3, w2).sum(), (x, w1, w3, w2))
    for a, b in zip(g1, g2):
        assert rel_err(a, b) <= 1e-14
