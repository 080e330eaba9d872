"""Reverse mode through the fused kernels under torch.func (``kernels.launch.backward_once``).

torch.func.grad / vjp over every public kernel function (primal and ``*_jvp`` forms) and over a whole
MeanFlow loss on the ``triton`` backend must give the gradients that plain autograd gives through the
same kernels, and agree with the pure-torch references in fp64. A second transform level (grad of grad,
jvp of grad) must refuse with NotImplementedError: the kernels' backward is not differentiable, and a
silent zero would be a wrong answer. fp32 (the interpreter's tl.dot has no bf16; the dtype does not
change the code path this file tests); on a GPU the same tests run in CUDA.
"""
from typing import Callable, List

import pytest
import torch

from meanflow_fast.kernels.attention import (attention, attention_jvp, attention_jvp_qkv, attention_jvp_qkv_ref, attention_jvp_ref,
                               attention_ref)
from meanflow_fast.kernels.gated_residual import gated_residual, gated_residual_jvp, gated_residual_jvp_ref, gated_residual_ref
from meanflow_fast.kernels.gated_residual_ln import (gated_residual_ln, gated_residual_ln_jvp, gated_residual_ln_jvp_ref,
                                       gated_residual_ln_ref)
from meanflow_fast.kernels.layernorm_modulate import ln_modulate, ln_modulate_jvp, ln_modulate_jvp_ref, ln_modulate_ref
from meanflow_fast.kernels.linear import linear_jvp, linear_jvp_ref
from meanflow_fast.kernels.mlp import mlp, mlp_jvp, mlp_jvp_ref, mlp_ref
from meanflow_fast import MeanFlowLoss, meanflow_dit
from meanflow_fast.model import MeanFlowDiT
from tests.helpers import HAS_CUDA, randomize_, rel_err, requires_cuda

DEVICE = "cuda" if HAS_CUDA else "cpu"
B, N, D, HEADS, HID = 2, 7, 40, 2, 72  # attention: head dim 32 (a supported one), 9 tokens


def _drawer(dtype, seed):
    """Random tensors from a fixed seed in fp64, cast to dtype: the same values for the kernel (fp32) and
    the reference (fp64) run."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64, device=DEVICE, generator=gen) * scale).to(dtype)
    return draw


# Which outputs of each case are differentiable: the first of a ``*_jvp`` pair (the tangent carries no
# graph), both of the fused residual + LN's (y, m), y and m of its jvp form (y, ẏ, m, ṁ).
OUTPUTS = {"gated_residual_ln": (0, 1), "gated_residual_ln_jvp": (0, 2)}


def _primals(name: str, f: Callable) -> Callable:
    """f returning the list of its differentiable outputs (OUTPUTS; the first one by default)."""
    def out(*args) -> List[torch.Tensor]:
        res = f(*args)
        return [res] if torch.is_tensor(res) else [res[i] for i in OUTPUTS.get(name, (0,))]
    return out


def _cases(dtype=torch.float64, seed=0):
    """name → (kernel fn, reference fn, inputs): both fns take the inputs to differentiate and return
    the list of differentiable outputs; tangents are fixed random constants. All in ``dtype``."""
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


NAMES = list(_cases())


def _loss(name, fn, weights):
    """Σ_outputs Σ (output ⊙ weight): a loss whose gradient is a vector-Jacobian product with random
    cotangents."""
    def loss(*inputs):
        return sum((o * w).sum() for o, w in zip(_primals(name, fn)(*inputs), weights))
    return loss


def _three_grads(name: str, dtype, seed: int = 0):
    """Per input of case ``name`` in ``dtype``: (torch.func.grad, plain autograd through the same kernels,
    autograd of the fp64 reference) of one random-cotangent loss."""
    fn, _, inputs = _cases(dtype, seed)[name]
    _, ref, inputs64 = _cases(torch.float64, seed)[name]
    weights = [torch.randn_like(o) for o in _primals(name, ref)(*inputs64)]
    loss = _loss(name, fn, [w.to(dtype) for w in weights])
    got = torch.func.grad(loss, argnums=tuple(range(len(inputs))))(*inputs)
    leaves = [t.clone().requires_grad_() for t in inputs]
    plain = torch.autograd.grad(loss(*leaves), leaves)
    leaves64 = [t.clone().requires_grad_() for t in inputs64]
    exact = torch.autograd.grad(_loss(name, ref, weights)(*leaves64), leaves64)
    return list(zip(got, plain, exact))


@pytest.mark.parametrize("name", NAMES)
def test_func_grad_equals_autograd_and_the_reference(name, seed):
    for i, (a, p, e) in enumerate(_three_grads(name, torch.float32, seed)):
        assert torch.equal(a, p), f"{name}: input {i}: torch.func.grad differs from autograd"
        assert rel_err(a, e) <= 1e-5, f"{name}: input {i}: rel err {rel_err(a, e):.3g} against fp64"


@requires_cuda
@pytest.mark.parametrize("name", ["attention_jvp_qkv", "mlp_jvp", "linear_jvp", "ln_modulate", "gated_residual_ln_jvp"])
def test_func_grad_equals_autograd_bf16_on_gpu(name):
    """On CUDA in bf16 (autograd's device threads, the autotuned kernels): torch.func.grad gives what plain
    autograd gives through the same kernels (deterministic: no atomics; 1e-3 leaves room for a cuBLAS
    heuristic), and stays near the fp64 reference (bf16: ~1e-2)."""
    for i, (a, p, e) in enumerate(_three_grads(name, torch.bfloat16)):
        assert rel_err(a, p) <= 1e-3, f"{name}: input {i}: torch.func.grad differs from autograd"
        assert rel_err(a, e) <= 3e-2, f"{name}: input {i}: rel err {rel_err(a, e):.3g} against fp64"


@pytest.mark.parametrize("name", ["attention", "mlp_jvp", "gated_residual_ln"])
def test_func_vjp_called_after_the_transform(name):
    """torch.func.vjp's vjp_fn runs the backward after the transform has ended, on saved tensors that
    are wrappers of a finished level (the kernels must take the op path there)."""
    fn, _, inputs = _cases(torch.float32)[name]
    _, ref, inputs64 = _cases(torch.float64)[name]
    outs, vjp_fn = torch.func.vjp(_primals(name, fn), *inputs)
    cots = [torch.randn_like(o) for o in outs]
    got = vjp_fn(cots)
    leaves = [t.clone().requires_grad_() for t in inputs64]
    exact = torch.autograd.grad(_primals(name, ref)(*leaves), leaves, [c.double() for c in cots])
    for i, (a, e) in enumerate(zip(got, exact)):
        assert rel_err(a, e) <= 1e-5, f"{name}: input {i}: rel err {rel_err(a, e):.3g} against fp64"


@pytest.mark.parametrize("name", ["attention", "mlp", "gated_residual_ln_jvp"])
def test_second_transform_level_refuses(name):
    """A grad of a grad, a jvp of a grad and a vjp_fn called inside a grad would differentiate the
    kernels' backward: NotImplementedError, never a silent zero."""
    fn, _, (x, *rest) = _cases(torch.float32)[name]

    def first(x_):
        return _loss(name, fn, [torch.ones_like(o) for o in _primals(name, fn)(x_, *rest)])(x_, *rest)

    def vjp_inside(x_):
        outs, vjp_fn = torch.func.vjp(lambda a: _primals(name, fn)(a, *rest), x_)
        return vjp_fn([torch.ones_like(o) for o in outs])[0].square().sum()

    for second in (lambda: torch.func.grad(lambda x_: torch.func.grad(first)(x_).square().sum())(x),
                   lambda: torch.func.jvp(torch.func.grad(first), (x,), (torch.randn_like(x),)),
                   lambda: torch.func.grad(vjp_inside)(x)):
        # (the *_jvp Functions have no forward-mode rule of their own: under a jvp of a grad torch stops
        # them first, with its own error)
        with pytest.raises((NotImplementedError, RuntimeError), match="not differentiable|implement the jvp"):
            second()


class _Stateless(torch.nn.Module):
    """The loss as a module around the model, so that torch.func.functional_call swaps the model's
    parameters for every call the loss makes (forward, forward_jvp)."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x, y, draws, drop):
        return self.loss_fn(self.model, x, y, **draws, drop=drop)[0]


def test_meanflow_loss_under_func_grad_on_the_triton_backend():
    """functional_call + torch.func.grad over a guided MeanFlow loss (the explicit forward_jvp on the
    fused kernels, the guidance forwards, the adaptive weight) against loss.backward() on the torch
    backend in fp64."""
    m64 = randomize_(meanflow_dit("tiny", input_size=4, in_channels=2, depth=2, hidden_size=64, num_heads=2,
                                  num_classes=5, freq_dim=16), std=0.2).double().to(DEVICE)
    model = MeanFlowDiT(m64.config, backend="triton").to(DEVICE)
    model.load_state_dict(m64.state_dict())
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, device=DEVICE)
    draws = dict(t=torch.tensor([0.9, 0.6, 0.3], dtype=torch.float64, device=DEVICE),
                 r=torch.tensor([0.2, 0.6, 0.1], dtype=torch.float64, device=DEVICE),
                 noise=torch.randn_like(x), drop=torch.tensor([False, True, False], device=DEVICE))
    y = torch.tensor([1, 4, 0], device=DEVICE)
    loss_fn = MeanFlowLoss(omega=0.8, kappa=0.1)

    params = {n: p.detach().float() for n, p in model.named_parameters()}

    times = {k: draws[k].float() for k in ("t", "r", "noise")}
    wrapper = _Stateless(model, loss_fn)

    def loss_of(p):
        return torch.func.functional_call(wrapper, {f"model.{n}": v for n, v in p.items()},
                                          (x.float(), y, times, draws["drop"]))

    got = torch.func.grad(loss_of)(params)
    ref_loss, _ = loss_fn(m64, x, y, **draws)
    ref = dict(zip([n for n, _ in m64.named_parameters()], torch.autograd.grad(ref_loss, list(m64.parameters()))))
    assert set(got) == set(ref)
    for n in ref:
        assert rel_err(got[n], ref[n]) <= 1e-4, f"{n}: rel err {rel_err(got[n], ref[n]):.3g}"


def test_eager_apply_skips_the_signature_binding(monkeypatch):
    """Outside a transform, KernelFunction.apply does not re-bind the arguments to forward's signature
    (torch's apply does, with inspect.signature, on every call: host time); under torch.func it is torch's
    apply. The eager results are those of the references."""
    import inspect
    real, bound = inspect.signature, []

    def spy(fn, *args, **kwargs):
        if (getattr(fn, "__module__", None) or "").startswith("kernels.") and fn.__name__ == "forward":
            bound.append(fn.__qualname__)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(inspect, "signature", spy)
    cases = _cases(torch.float32)
    for name in ("ln_modulate", "mlp_jvp", "attention"):
        fn, _, inputs = cases[name]
        _, ref, inputs64 = _cases(torch.float64)[name]
        got, = _primals(name, fn)(*inputs)
        assert rel_err(got, _primals(name, ref)(*inputs64)[0]) <= 1e-5, name
    assert bound == []
    x, sh, sc = cases["ln_modulate"][2]
    torch.func.grad(lambda a: ln_modulate(a, sh, sc).sum())(x)
    assert bound, "under torch.func the Function should go through torch's own apply"


def test_plain_backward(monkeypatch):
    """Outside torch.func: the usual backward launches its kernels directly (not through the custom ops);
    with create_graph=True it goes through the ops, so that differentiating it again fails loudly at the
    backward op (no autograd formula) instead of silently dropping the kernels' share of the second
    derivative (a directly launched kernel is invisible to autograd; here x³ keeps the graph alive)."""
    import meanflow_fast.kernels.launch as utils
    seen = []
    real = utils._needs_op
    monkeypatch.setattr(utils, "_needs_op", lambda args: seen.append(real(args)) or seen[-1])
    x, sh, sc = (t.requires_grad_() for t in _cases(torch.float32)["ln_modulate"][2])

    def loss():
        y = ln_modulate(x, sh, sc)
        return (y * y).sum() + (x ** 3).sum()

    first = loss()
    seen.clear()
    torch.autograd.grad(first, x)
    assert seen == [False], seen  # the backward kernel, launched directly
    first = loss()
    seen.clear()
    (gx,) = torch.autograd.grad(first, x, create_graph=True)
    assert seen == [True], seen
    with pytest.raises(RuntimeError, match="autograd formula"):
        gx.sum().backward()
