"""torch.compile (inductor) over the whole model's fused path, on the CPU: the Triton kernels are
torch.library custom ops, so inductor must keep them as opaque calls, trace their fake (meta) versions
for shapes, and differentiate through their registered backward. This is the CPU half of the GPU test
`test_gpu_model.py::test_compiled_forward_jvp_equals_eager`: the same registration, with inductor's C++
code around the ops instead of its Triton code (the kernels themselves run in the interpreter)."""
import pytest
import torch

from meanflow_fast import meanflow_dit
from tests.helpers import HAS_CUDA, randomize_, rel_err

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="CPU-side compile check (on a GPU: test_gpu_model.py)")


def _model_and_inputs(B=3):
    model = randomize_(meanflow_dit("tiny"), std=0.1)
    model.backend = "triton"
    c = model.config
    z = torch.randn(B, c.in_channels, c.input_size, c.input_size)
    t = torch.rand(B)
    return model, (z, t * torch.rand(B), t, torch.randint(0, c.num_classes, (B,)), torch.randn_like(z))


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_inductor_forward_jvp_fullgraph_equals_eager():
    """One graph (fullgraph=True: no graph break around any custom op), the same (u, du/dt), and the
    same parameter gradients of a loss on u, as the eager fused path."""
    torch._dynamo.reset()
    model, inp = _model_and_inputs()
    u, d = model.forward_jvp(*inp)
    w = torch.randn_like(u)
    (u * w).sum().backward()
    g = _grads(model)
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model.forward_jvp, backend="inductor", fullgraph=True)
    uc, dc = compiled(*inp)
    assert dc.grad_fn is None, "du/dt must carry no autograd graph under compile either"
    (uc * w).sum().backward()
    gc = _grads(model)
    assert rel_err(uc, u) <= 1e-5 and rel_err(dc, d) <= 1e-5, (rel_err(uc, u), rel_err(dc, d))
    assert rel_err(gc, g) <= 1e-5, rel_err(gc, g)


def test_inductor_triton_forward_fullgraph_equals_eager():
    """The plain forward on the primal-only fused ops (backend="triton") under inductor: one graph, the
    same output and parameter gradients as eager. Under compile the ops' Functions are the variants
    without a forward-mode ``jvp``, which Dynamo cannot trace (``meanflow_fast.kernels.launch.pick_function``)."""
    torch._dynamo.reset()
    model, (z, r, t, y, _) = _model_and_inputs()
    u = model(z, r, t, y)
    w = torch.randn_like(u)
    (u * w).sum().backward()
    g = _grads(model)
    model.zero_grad(set_to_none=True)
    uc = torch.compile(model, backend="inductor", fullgraph=True)(z, r, t, y)
    (uc * w).sum().backward()
    assert rel_err(uc, u) <= 1e-5 and rel_err(_grads(model), g) <= 1e-5
