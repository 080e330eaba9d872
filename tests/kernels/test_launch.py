"""The launch framework (kernels/launch.py). ``kernel_op``: a launcher registered as a torch.library op,
called directly in eager mode and through the op wherever something traces, transforms or watches the call
(torch.compile, a dispatch mode such as FakeTensorMode or a logger); chains of the kernels traced whole by
torch.compile. ``KernelFunction`` and ``backward_once``: the kernels' autograd Functions inside and outside
torch.func. torch.func over each kernel is tested in that kernel's file."""
import sys

import pytest
import torch

from meanflow_fast.kernels.gated_residual import gated_residual, gated_residual_jvp
from meanflow_fast.kernels.launch import kernel_op
from meanflow_fast.kernels.layernorm_modulate import ln_modulate, ln_modulate_jvp
from meanflow_fast.kernels.linear import linear_jvp
from meanflow_fast.kernels.mlp import mlp, mlp_jvp
from tests.helpers import OpLog, rel_err, requires_cuda
from tests.kernels.cases import DEVICE, differentiable, func_cases

_CALLS = []  # one entry per call of the probe's launcher: did it run inside the dispatcher's custom-op code?


def _inside_custom_op() -> bool:
    f = sys._getframe(1)
    while f is not None:
        if "torch/_library/" in f.f_code.co_filename.replace("\\", "/"):
            return True
        f = f.f_back
    return False


@kernel_op("meanflow_fast_test::scaled_copy")
def _probe(x: torch.Tensor, a: float) -> torch.Tensor:
    _CALLS.append(_inside_custom_op())
    return x * a


@_probe.register_fake
def _(x, a):
    return torch.empty_like(x)


def test_eager_call_runs_the_launcher_directly():
    _CALLS.clear()
    x = torch.randn(5, 3)
    assert torch.equal(_probe(x, 2.5), x * 2.5)
    assert _CALLS == [False], "an eager call went through the dispatcher"
    # the registered op itself still works (what torch.compile and tests call)
    assert torch.equal(torch.ops.meanflow_fast_test.scaled_copy(x, 2.5), x * 2.5)
    assert _CALLS == [False, True]


def test_a_dispatch_mode_sees_the_op():
    """Under a TorchDispatchMode (a logger here; FakeTensorMode and AOTAutograd's tracers are modes too)
    the call goes through the op, so the mode sees one op, not the launcher's inside."""
    _CALLS.clear()
    x = torch.randn(4, 2)
    with OpLog() as log:
        y = _probe(x, -1.5)
    assert "meanflow_fast_test.scaled_copy" in log.ops, log.ops
    assert "aten.mul" not in log.ops, log.ops  # the launcher's own op ran below the custom op
    assert torch.equal(y, x * -1.5) and _CALLS == [True]


def test_fake_tensors_go_through_the_op():
    """Fake tensors (no data): the op's fake implementation gives the shape; a direct launch of a real
    kernel would have read their (absent) memory."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from meanflow_fast.kernels.linear import linear_jvp
    with FakeTensorMode():
        x, xd = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
        w, b = torch.randn(24, 16), torch.randn(24)
        y, yd = linear_jvp(x, w, b, xd)
    assert y.shape == yd.shape == (2, 7, 24)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_call_goes_through_the_op(backend):
    _CALLS.clear()
    torch._dynamo.reset()
    x = torch.randn(6)
    fn = torch.compile(lambda t: _probe(t, 3.0) + 1.0, backend=backend, fullgraph=True)
    assert torch.equal(fn(x), x * 3.0 + 1.0)
    assert _CALLS and all(_CALLS), _CALLS


def test_steps_per_program():
    from meanflow_fast.kernels.launch import steps_per_program
    assert [steps_per_program(t) for t in (0, 1, 12288, 16384)] == [1, 1, 1, 1]
    assert [steps_per_program(t) for t in (16385, 32768, 32769, 10 ** 7)] == [2, 2, 4, 8]
    assert steps_per_program(100, target_programs=10, max_steps=16) == 16


# =================================================================================================
#                  KernelFunction and backward_once: the Functions in and out of torch.func
# =================================================================================================
def test_eager_apply_skips_the_signature_binding(monkeypatch):
    """Outside a transform, KernelFunction.apply does not re-bind the arguments to forward's signature
    (torch's apply does, with inspect.signature, on every call: host time); under torch.func it is torch's
    apply. The eager results are those of the references."""
    import inspect
    real, bound = inspect.signature, []

    def spy(fn, *args, **kwargs):
        if (getattr(fn, "__module__", None) or "").startswith("meanflow_fast.kernels.") and fn.__name__ == "forward":
            bound.append(fn.__qualname__)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(inspect, "signature", spy)
    cases = func_cases(torch.float32)
    for name in ("ln_modulate", "mlp_jvp", "attention"):
        fn, _, inputs = cases[name]
        _, ref, inputs64 = func_cases(torch.float64)[name]
        got, = differentiable(name, fn)(*inputs)
        assert rel_err(got, differentiable(name, ref)(*inputs64)[0]) <= 1e-5, name
    assert bound == []
    x, sh, sc = cases["ln_modulate"][2]
    torch.func.grad(lambda a: ln_modulate(a, sh, sc).sum())(x)
    assert bound, "under torch.func the Function should go through torch's own apply"


def test_plain_backward(monkeypatch):
    """Outside torch.func: the usual backward launches its kernels directly (not through the custom ops);
    with create_graph=True it goes through the ops, so that differentiating it again fails loudly at the
    backward op (NotImplementedError) instead of silently dropping the kernels' share of the second
    derivative (a directly launched kernel is invisible to autograd; here x³ keeps the graph alive)."""
    import meanflow_fast.kernels.launch as utils
    seen = []
    real = utils._needs_op
    monkeypatch.setattr(utils, "_needs_op", lambda args: seen.append(real(args)) or seen[-1])
    x, sh, sc = (t.requires_grad_() for t in func_cases(torch.float32)["ln_modulate"][2])

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
    with pytest.raises(NotImplementedError, match="ln_modulate_bwd: the Triton kernels' backward is not "
                                                  "differentiable.*backend='torch'"):
        gx.sum().backward()


# Not linear_jvp: its backward is three torch GEMMs, which differentiate again (correctly) as torch's do.
@pytest.mark.parametrize("name", ["attention", "attention_jvp_qkv", "mlp", "mlp_jvp", "ln_modulate",
                                  "ln_modulate_jvp", "gated_residual", "gated_residual_jvp", "gated_residual_ln",
                                  "gated_residual_ln_jvp"])
def test_create_graph_second_derivative_raises(name):
    """A create_graph=True gradient through the kernels, then a backward through it, reaches a backward
    kernel's custom op: NotImplementedError pointing to backend='torch', not a bare "no autograd formula"."""
    fn, _, inputs = func_cases(torch.float32)[name]
    leaves = [t.clone().requires_grad_() for t in inputs]
    loss = sum(o.square().sum() for o in differentiable(name, fn)(*leaves))
    first = torch.autograd.grad(loss, leaves, create_graph=True)
    with pytest.raises(NotImplementedError, match=r"not differentiable.*backend='torch'"):
        sum(g.square().sum() for g in first).backward()


# =================================================================================================
#          Chains of the kernels under torch.compile: each launch is one opaque custom op
# =================================================================================================
def _dual_block(x, x_dot, mod, mod_dot, w1, b1, w2, b2, wp):
    """A DiT-block-like chain of the four dual ops (the mod tensors split like adaLN's chunk)."""
    sh, sc, g = mod.chunk(3, dim=1)
    dsh, dsc, dg = mod_dot.chunk(3, dim=1)
    h, h_dot = ln_modulate_jvp(x, sh, sc, x_dot, dsh, dsc, 1e-6)
    h, h_dot = linear_jvp(h, wp, None, h_dot)
    f, f_dot = mlp_jvp(h, w1, b1, w2, b2, h_dot)
    return gated_residual_jvp(x, g, f, x_dot, dg, f_dot)


def _dual_block_inputs(B, N, D, H, dtype):
    def r(*s, scale=1.0):
        return (torch.randn(*s, device=DEVICE) * scale).to(dtype)
    x, xd = r(B, N, D).requires_grad_(), r(B, N, D)
    mod, mod_dot = r(B, 3 * D, scale=0.5).requires_grad_(), r(B, 3 * D, scale=0.5)
    w1, b1 = r(H, D, scale=D ** -0.5).requires_grad_(), r(H).requires_grad_()
    w2, b2 = r(D, H, scale=H ** -0.5).requires_grad_(), r(D).requires_grad_()
    wp = r(D, D, scale=D ** -0.5).requires_grad_()
    return x, xd, mod, mod_dot, w1, b1, w2, b2, wp


def _compare_compiled_dual(backend, B, N, D, H, dtype, tol):
    args = _dual_block_inputs(B, N, D, H, dtype)
    leaves = [a for a in args if a.requires_grad]
    y, y_dot = _dual_block(*args)
    g = torch.autograd.grad(y.float().square().sum(), leaves)
    torch._dynamo.reset()
    compiled = torch.compile(_dual_block, backend=backend, fullgraph=True)
    y_c, yd_c = compiled(*args)
    g_c = torch.autograd.grad(y_c.float().square().sum(), leaves)
    assert not yd_c.requires_grad
    assert rel_err(y_c, y) <= tol and rel_err(yd_c, y_dot) <= tol
    for a, b in zip(g_c, g):
        assert rel_err(a, b) <= tol


def test_eager_calls_go_through_the_custom_ops_and_aot_eager_compiles():
    """On CPU torch.compile cannot trace an interpreted kernel, but it need not: each launch is one
    opaque custom op. aot_eager traces the whole chain (fullgraph) and must equal eager exactly."""
    _compare_compiled_dual("aot_eager", 2, 5, 40, 72, torch.float32, 1e-6)


@requires_cuda
def test_torch_compile_matches_eager_on_gpu():
    _compare_compiled_dual("inductor", 4, 64, 128, 512, torch.bfloat16, 1e-2)


def _primal_block(x, mod, w1, b1, w2, b2):
    """A DiT-block-like chain of the three primal ops (the mod tensors split like adaLN's chunk)."""
    sh, sc, g = mod.chunk(3, dim=1)
    return gated_residual(x, g, mlp(ln_modulate(x, sh, sc, 1e-6), w1, b1, w2, b2))


def _compare_compiled_primal(backend, B, N, D, H, dtype, tol):
    def r(*s, scale=1.0):
        return (torch.randn(*s, device=DEVICE) * scale).to(dtype).requires_grad_()
    args = (r(B, N, D), r(B, 3 * D, scale=0.5), r(H, D, scale=D ** -0.5), r(H), r(D, H, scale=H ** -0.5), r(D))
    y = _primal_block(*args)
    g = torch.autograd.grad(y.float().square().sum(), args)
    torch._dynamo.reset()
    y_c = torch.compile(_primal_block, backend=backend, fullgraph=True)(*args)
    g_c = torch.autograd.grad(y_c.float().square().sum(), args)
    assert rel_err(y_c, y) <= tol
    for a, b in zip(g_c, g):
        assert rel_err(a, b) <= tol


def test_primal_ops_trace_with_aot_eager():
    """Each launch is one opaque custom op: aot_eager traces the chain (fullgraph) and equals eager."""
    _compare_compiled_primal("aot_eager", 2, 5, 40, 72, torch.float32, 1e-6)


@requires_cuda
def test_primal_torch_compile_matches_eager_on_gpu():
    _compare_compiled_primal("inductor", 4, 64, 128, 512, torch.bfloat16, 1e-2)


def test_compile_twins_pickle_by_name():
    """Each Function's twin without jvp is a module attribute under its own name, like any class."""
    import pickle
    import meanflow_fast.kernels.attention as attention_mod
    import meanflow_fast.kernels.gated_residual as gated_mod
    import meanflow_fast.kernels.gated_residual_ln as grl_mod
    import meanflow_fast.kernels.layernorm_modulate as ln_mod
    import meanflow_fast.kernels.mlp as mlp_mod
    for fn in (attention_mod.AttentionFunction, gated_mod.GatedResidualFunction, grl_mod.GatedResidualLnFunction,
               ln_mod.LnModulateFunction, mlp_mod.MlpFunction):
        twin = fn.without_jvp
        assert twin is not fn and "jvp" not in vars(twin) and "jvp" in vars(fn)
        assert pickle.loads(pickle.dumps(twin)) is twin
