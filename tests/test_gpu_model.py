"""Whole-model GPU tests (skipped without CUDA): the fused `triton` backend (forward_jvp and the plain
forward) in bf16 at DiT-B/2 and XL/2 shapes, under torch.compile, and inside the MeanFlow training step.

Tolerance rule (flash-attention's): the fused path's error against an fp32 reference is at most 2× the
error of the pure-torch path run at the same precision, plus a small atol-like floor.
"""
import pytest
import torch

from meanflow_fast import MeanFlowLoss, meanflow_dit
from tests.helpers import rel_err, requires_cuda


def _gpu_model(preset, seed=0, **kw):
    torch.manual_seed(seed)
    model = meanflow_dit(preset, **kw)
    with torch.no_grad():  # non-zero adaLN / output weights: the zero init would hide tangent bugs
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name:
                p.normal_(0, 0.02)
    return model.cuda()


def _inputs(model, B):
    c = model.config
    z = torch.randn(B, c.in_channels, c.input_size, c.input_size, device="cuda")
    t = torch.rand(B, device="cuda")
    return z, t * torch.rand(B, device="cuda"), t, torch.randint(0, c.num_classes, (B,), device="cuda"), torch.randn_like(z)


def _err(a, b):
    return rel_err(a.float(), b.float())


@requires_cuda
@pytest.mark.parametrize("preset,B", [("B/2", 4), ("XL/2", 2)])
def test_triton_backend_bf16_whole_model(preset, B):
    model = _gpu_model(preset)
    z, r, t, y, dz = _inputs(model, B)
    with torch.no_grad():
        u32, d32 = model.forward_jvp(z, r, t, y, dz, backend="torch")      # fp32 reference
        mb = model.to(torch.bfloat16)
        zb, dzb = z.bfloat16(), dz.bfloat16()
        u_t, d_t = mb.forward_jvp(zb, r, t, y, dzb, backend="torch")       # torch at bf16
        u_k, d_k = mb.forward_jvp(zb, r, t, y, dzb, backend="triton")      # fused kernels at bf16
    print(f"{preset}: torch bf16 err u {_err(u_t, u32):.2e} du/dt {_err(d_t, d32):.2e}; "
          f"triton bf16 err u {_err(u_k, u32):.2e} du/dt {_err(d_k, d32):.2e}")
    assert _err(u_k, u32) <= 2 * _err(u_t, u32) + 1e-3
    assert _err(d_k, d32) <= 2 * _err(d_t, d32) + 1e-3


@requires_cuda
def test_triton_plain_forward_bf16_b2():
    """The plain forward with backend="triton" (primal-only fused kernels) in bf16 at DiT-B/2 against the
    fp32 torch forward: output and parameter gradients within 2× the bf16 torch forward's own error."""
    model = _gpu_model("B/2")
    z, r, t, y, _ = _inputs(model, 4)
    w = torch.randn_like(z)

    def run(m, z_, backend):
        m.zero_grad(set_to_none=True)
        u = m(z_, r, t, y, backend=backend)
        (u.float() * w).sum().backward()
        return u.detach().float(), torch.cat([p.grad.float().flatten() for p in m.parameters()])

    u32, g32 = run(model, z, "torch")                       # fp32 reference
    mb = model.to(torch.bfloat16)
    u_t, g_t = run(mb, z.bfloat16(), "torch")               # torch at bf16
    u_k, g_k = run(mb, z.bfloat16(), "triton")              # fused primal kernels at bf16
    print(f"B/2 forward: torch bf16 err u {_err(u_t, u32):.2e} grad {_err(g_t, g32):.2e}; "
          f"triton bf16 err u {_err(u_k, u32):.2e} grad {_err(g_k, g32):.2e}")
    assert _err(u_k, u32) <= 2 * _err(u_t, u32) + 1e-3
    assert _err(g_k, g32) <= 2 * _err(g_t, g32) + 1e-2


@requires_cuda
def test_compiled_triton_forward_equals_eager():
    model = _gpu_model("S/2", input_size=16, depth=4).to(torch.bfloat16)
    model.backend = "triton"
    z, r, t, y, _ = _inputs(model, 8)
    with torch.no_grad():
        u = model(z.bfloat16(), r, t, y)
        uc = torch.compile(model)(z.bfloat16(), r, t, y)
    assert _err(uc, u) <= 1e-2


@requires_cuda
def test_compiled_forward_jvp_equals_eager():
    model = _gpu_model("S/2", input_size=16, depth=4).to(torch.bfloat16)
    model.backend = "triton"
    z, r, t, y, dz = _inputs(model, 8)
    z, dz = z.bfloat16(), dz.bfloat16()
    with torch.no_grad():
        u, d = model.forward_jvp(z, r, t, y, dz)
        uc, dc = torch.compile(model.forward_jvp)(z, r, t, y, dz)
    assert _err(uc, u) <= 1e-2 and _err(dc, d) <= 1e-2


@requires_cuda
def test_train_step_triton_autocast_matches_torch_reference():
    """Loss and parameter gradients of one MeanFlow step: fused path under bf16 autocast vs the torch
    path in fp32 (the reference), bounded by 2× the torch path's own error under bf16 autocast."""
    model = _gpu_model("S/2", input_size=16, depth=4)
    c = model.config
    x = torch.randn(16, c.in_channels, c.input_size, c.input_size, device="cuda")
    y = torch.randint(0, c.num_classes, (16,), device="cuda")
    loss_fn = MeanFlowLoss(omega=0.5, kappa=0.3)

    def run(backend, autocast):
        model.backend = backend
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = loss_fn(model, x, y, generator=torch.Generator(device="cuda").manual_seed(0))
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    l_ref, g_ref = run("torch", False)
    l_t, g_t = run("torch", True)
    l_k, g_k = run("triton", True)
    print(f"loss err torch-bf16 {_err(l_t, l_ref):.2e} triton-bf16 {_err(l_k, l_ref):.2e}; grad err "
          f"{_err(g_t, g_ref):.2e} vs {_err(g_k, g_ref):.2e}")
    assert _err(l_k, l_ref) <= 2 * _err(l_t, l_ref) + 1e-3
    assert _err(g_k, g_ref) <= 2 * _err(g_t, g_ref) + 1e-2
