"""``kernels.launch.kernel_op``: a launcher registered as a torch.library op, called directly in eager
mode and through the op wherever something traces, transforms or watches the call (torch.compile, a
dispatch mode such as FakeTensorMode or a logger). torch.func.jvp over the fused kernels (functorch: the
op path) is tested beside each kernel (test_attention, test_primal_kernels, test_gated_residual_ln,
test_model)."""
import sys

import pytest
import torch

from meanflow_fast.kernels.launch import kernel_op
from tests.helpers import OpLog

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
