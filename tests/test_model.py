"""The MeanFlow DiT: presets, and the explicit dual-stream forward against torch.func.jvp."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from meanflow_fast import MeanFlowLoss
from meanflow_fast.model import (PRESETS, DiTBlock, FinalLayer, MeanFlowDiT, TimestepEmbedder,
                                 meanflow_dit)
from meanflow_fast.ops import get_dual_ops
from tests.helpers import OpLog, randomize_, rel_err

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
TORCH_OPS = get_dual_ops("torch")


def func_jvp(f, primals, tangents):
    with sdpa_kernel([SDPBackend.MATH]):  # no forward-AD rule for flash SDPA
        return torch.func.jvp(f, primals, tangents)


@pytest.mark.parametrize("preset,target", [("B/2", 131e6), ("M/2", 308e6), ("L/2", 459e6), ("XL/2", 676e6)])
def test_preset_parameter_counts(preset, target):
    with torch.device("meta"):
        model = meanflow_dit(preset)
    n = sum(p.numel() for p in model.parameters())
    print(f"{preset}: {n / 1e6:.2f}M parameters (paper: {target / 1e6:.0f}M)")
    assert abs(n - target) / target < 0.02


def test_head_dim_of_xl_is_72():
    cfg = meanflow_dit("tiny", hidden_size=1152, num_heads=16, depth=1).config
    assert cfg.hidden_size // cfg.num_heads == 72


# ------------------------------------------------------------------------------- single pieces
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_timestep_embedder_jvp(dtype):
    emb = randomize_(TimestepEmbedder(48, freq_dim=32)).to(dtype)
    s = torch.rand(5, dtype=dtype)
    s_dot = torch.randn(5, dtype=dtype)
    y, y_dot = emb.forward_jvp(s, s_dot)
    y_ref, y_dot_ref = func_jvp(emb, (s,), (s_dot,))
    assert rel_err(y, y_ref) <= TOL[dtype]
    assert rel_err(y_dot, y_dot_ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,N,D,H", [(2, 7, 48, 3), (3, 16, 64, 2), (1, 1, 32, 4)])
def test_dit_block_jvp(dtype, B, N, D, H):
    block = randomize_(DiTBlock(D, H), std=0.2).to(dtype)
    x, x_dot = torch.randn(B, N, D, dtype=dtype), torch.randn(B, N, D, dtype=dtype)
    c, c_dot = torch.randn(B, D, dtype=dtype), torch.randn(B, D, dtype=dtype)
    y, y_dot = block.forward_jvp(x, x_dot, c, c_dot, TORCH_OPS)
    y_ref, y_dot_ref = func_jvp(block, (x, c), (x_dot, c_dot))
    assert rel_err(y, y_ref) <= TOL[dtype]
    assert rel_err(y_dot, y_dot_ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_final_layer_jvp(dtype):
    layer = randomize_(FinalLayer(40, 2, 3)).to(dtype)
    x, x_dot = torch.randn(2, 9, 40, dtype=dtype), torch.randn(2, 9, 40, dtype=dtype)
    c, c_dot = torch.randn(2, 40, dtype=dtype), torch.randn(2, 40, dtype=dtype)
    y, y_dot = layer.forward_jvp(x, x_dot, c, c_dot, TORCH_OPS)
    y_ref, y_dot_ref = func_jvp(layer, (x, c), (x_dot, c_dot))
    assert rel_err(y, y_ref) <= TOL[dtype]
    assert rel_err(y_dot, y_dot_ref) <= TOL[dtype]


# ------------------------------------------------------------------------------- whole model
def _model(dtype, **kw):
    cfg = dict(input_size=6, in_channels=3, depth=2, hidden_size=48, num_heads=3, num_classes=7, freq_dim=32)
    cfg.update(kw)
    return randomize_(meanflow_dit("tiny", **cfg), std=0.15).to(dtype)


def _inputs(model, B, dtype):
    cfg = model.config
    z = torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size, dtype=dtype)
    t = torch.rand(B, dtype=dtype)
    r = t * torch.rand(B, dtype=dtype)
    y = torch.randint(0, cfg.num_classes + 1, (B,))  # the null label included
    return z, r, t, y, torch.randn_like(z)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B", [1, 3])
def test_model_forward_jvp_matches_torch_func_jvp(dtype, B):
    model = _model(dtype)
    z, r, t, y, dz = _inputs(model, B, dtype)
    u, dudt = model.forward_jvp(z, r, t, y, dz)
    u_ref, dudt_ref = func_jvp(lambda z_, r_, t_: model(z_, r_, t_, y), (z, r, t),
                               (dz, torch.zeros_like(r), torch.ones_like(t)))
    assert u.shape == dudt.shape == z.shape
    assert rel_err(u, u_ref) <= TOL[dtype]
    assert rel_err(dudt, dudt_ref) <= TOL[dtype]


@pytest.mark.parametrize("direction", ["per-sample", "d/dr", "scalars"])
def test_model_forward_jvp_along_any_direction(direction):
    """forward_jvp(dr=..., dt=...) against torch.func.jvp along (dz, dr, dt) in fp64: per-sample (B,)
    tangents of both times, ∂u/∂r along dz (dr = 1, dt = 0), and 0-d / float ones."""
    model = _model(torch.float64)
    B = 3
    z, r, t, y, dz = _inputs(model, B, torch.float64)
    dr, dt = {"per-sample": (torch.randn(B, dtype=torch.float64), torch.randn(B, dtype=torch.float64)),
              "d/dr": (1.0, 0.0),
              "scalars": (torch.tensor(0.3, dtype=torch.float64), -1.7)}[direction]
    u, u_dot = model.forward_jvp(z, r, t, y, dz, dr=dr, dt=dt)
    as_b = lambda v: torch.as_tensor(v, dtype=torch.float64).expand(B)  # noqa: E731
    u_ref, u_dot_ref = func_jvp(lambda z_, r_, t_: model(z_, r_, t_, y), (z, r, t), (dz, as_b(dr), as_b(dt)))
    assert rel_err(u, u_ref) <= TOL[torch.float64]
    assert rel_err(u_dot, u_dot_ref) <= TOL[torch.float64]
    with pytest.raises(ValueError, match=r"dt must be a float, a 0-d tensor or shape \(3,\)"):
        model.forward_jvp(z, r, t, y, dz, dt=torch.ones(2, dtype=torch.float64))


def test_model_forward_jvp_fp32_close_to_fp64():
    m64 = _model(torch.float64, input_size=8, patch_size=4, hidden_size=64, num_heads=4)
    m32 = MeanFlowDiT(m64.config)
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    z, r, t, y, dz = _inputs(m64, 2, torch.float64)
    u64, d64 = m64.forward_jvp(z, r, t, y, dz)
    u32, d32 = m32.forward_jvp(z.float(), r.float(), t.float(), y, dz.float())
    assert rel_err(u32, u64) <= 1e-5 and rel_err(d32, d64) <= 1e-5


def test_forward_jvp_tangent_carries_no_graph_and_grads_match_forward():
    model = _model(torch.float64)
    z, r, t, y, dz = _inputs(model, 3, torch.float64)
    w = torch.randn_like(z)
    u, dudt = model.forward_jvp(z, r, t, y, dz)
    assert not dudt.requires_grad and dudt.grad_fn is None
    grads_jvp = torch.autograd.grad((u * w).sum() + (u ** 2).sum(), list(model.parameters()), allow_unused=True)
    u2 = model(z, r, t, y)
    grads_fwd = torch.autograd.grad((u2 * w).sum() + (u2 ** 2).sum(), list(model.parameters()), allow_unused=True)
    for (name, _), g1, g2 in zip(model.named_parameters(), grads_jvp, grads_fwd):
        assert (g1 is None) == (g2 is None), name
        if g1 is not None:
            assert rel_err(g1, g2) <= 1e-12, name


def test_default_init_is_adaln_zero():
    model = meanflow_dit("tiny")
    z, r, t, y, dz = _inputs(model, 2, torch.float32)
    u, dudt = model.forward_jvp(z, r, t, y, dz)
    assert u.abs().max() == 0 and dudt.abs().max() == 0


def test_scalar_times_broadcast():
    model = _model(torch.float64)
    z, _, _, y, _ = _inputs(model, 2, torch.float64)
    a = model(z, 0.0, 1.0, y)
    b = model(z, torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), y)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad,match", [
    (dict(z=torch.randn(2, 3, 5, 5)), r"z must have shape \(B, 3, 6, 6\)"),
    (dict(z=torch.randn(0, 3, 6, 6)), "empty batch"),
    (dict(y=torch.zeros(2)), "y must be an integer tensor"),
    (dict(t=torch.rand(3)), r"t must be a float, a 0-d tensor or shape \(2,\)"),
    (dict(dz=torch.randn(2, 3, 6, 5)), "dz must be a tensor shaped like z"),
])
def test_model_rejects_bad_input(bad, match):
    model = _model(torch.float32)
    z, r, t, y, dz = _inputs(model, 2, torch.float32)
    args = dict(z=z, r=r, t=t, y=y, dz=dz)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        model.forward_jvp(**args)


def test_unknown_preset_and_backend():
    with pytest.raises(ValueError, match="preset must be one of"):
        meanflow_dit("H/2")
    with pytest.raises(ValueError, match="unknown DiTConfig field"):
        meanflow_dit("tiny", widht=3)
    with pytest.raises(ValueError, match="backend must be one of"):
        MeanFlowDiT(meanflow_dit("tiny").config, backend="cuda")
    assert set(PRESETS) >= {"B/2", "M/2", "L/2", "XL/2"}


# ------------------------------------------------------------------------------- triton backend
TRITON_TOL = {torch.float32: 1e-5, torch.float16: 5e-3}  # fp16: observed 1.3e-3 (u), 1.5e-3 (du/dt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_model_triton_backend_matches_torch_func_jvp(dtype):
    """The fused kernels (interpreter on CPU, CUDA on a GPU) through the whole model, against
    torch.func.jvp over the plain forward in fp64; parameter gradients against the plain forward."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m64 = _model(torch.float64, input_size=8, hidden_size=64, num_heads=2)  # head dim 32, 16 tokens
    z, r, t, y, dz = _inputs(m64, 2, torch.float64)
    u_ref, dudt_ref = func_jvp(lambda z_, r_, t_: m64(z_, r_, t_, y), (z, r, t),
                               (dz, torch.zeros_like(r), torch.ones_like(t)))
    model = MeanFlowDiT(m64.config, backend="triton").to(device)
    model.load_state_dict(m64.state_dict())
    model = model.to(dtype)
    u, dudt = model.forward_jvp(z.to(device, dtype), r.to(device), t.to(device), y.to(device),
                                dz.to(device, dtype))
    assert u.dtype == dtype and not dudt.requires_grad
    assert rel_err(u.cpu(), u_ref) <= TRITON_TOL[dtype]
    assert rel_err(dudt.cpu(), dudt_ref) <= TRITON_TOL[dtype]
    if dtype == torch.float32:
        w = torch.randn_like(z)
        g_triton = torch.autograd.grad((u * w.to(device)).sum(), list(model.parameters()))
        u64 = m64(z, r, t, y)
        g_ref = torch.autograd.grad((u64 * w).sum(), list(m64.parameters()))
        for (name, _), a, b in zip(m64.named_parameters(), g_triton, g_ref):
            assert rel_err(a.cpu(), b) <= 1e-4, name


def test_model_triton_backend_along_any_direction():
    """The fused path along a per-sample (dz, dr, dt): only the conditioning's tangent changes, the kernels
    see it through ċ (fp32, against torch.func.jvp over the fp64 model)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m64 = _model(torch.float64, input_size=8, hidden_size=64, num_heads=2)
    z, r, t, y, dz = _inputs(m64, 2, torch.float64)
    dr, dt = torch.randn(2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    u_ref, u_dot_ref = func_jvp(lambda z_, r_, t_: m64(z_, r_, t_, y), (z, r, t), (dz, dr, dt))
    model = MeanFlowDiT(m64.config, backend="triton").to(device)
    model.load_state_dict(m64.state_dict())
    f32 = lambda v: v.to(device, torch.float32)  # noqa: E731
    u, u_dot = model.forward_jvp(f32(z), f32(r), f32(t), y.to(device), f32(dz), dr=f32(dr), dt=f32(dt))
    assert rel_err(u.cpu(), u_ref) <= TRITON_TOL[torch.float32]
    assert rel_err(u_dot.cpu(), u_dot_ref) <= TRITON_TOL[torch.float32]


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
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m64 = randomize_(meanflow_dit("tiny", input_size=4, in_channels=2, depth=2, hidden_size=64, num_heads=2,
                                  num_classes=5, freq_dim=16), std=0.2).double().to(device)
    model = MeanFlowDiT(m64.config, backend="triton").to(device)
    model.load_state_dict(m64.state_dict())
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, device=device)
    draws = dict(t=torch.tensor([0.9, 0.6, 0.3], dtype=torch.float64, device=device),
                 r=torch.tensor([0.2, 0.6, 0.1], dtype=torch.float64, device=device),
                 noise=torch.randn_like(x), drop=torch.tensor([False, True, False], device=device))
    y = torch.tensor([1, 4, 0], device=device)
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


# ------------------------------------------------------------------------------- plain forward, triton backend
FWD_FLOOR = {torch.float32: 1e-7, torch.float16: 1e-4}  # ~1 and ~0.2 unit roundoffs, below the errors seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_model_forward_triton_matches_torch(dtype):
    """The plain forward with backend="triton" (fused LN-modulate, gated residual, fc1 + GELU; interpreter
    on CPU) against backend="torch" at the same precision, both measured against the fp64 torch forward:
    the output and every parameter's gradient within 2× torch's own error + a floor (observed ≤ 1.6×).
    Random non-zero adaLN and output weights: the adaLN-Zero init would make every block the identity."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m64 = _model(torch.float64, input_size=8, hidden_size=64, num_heads=2)  # head dim 32, 16 tokens
    z, r, t, y, _ = _inputs(m64, 3, torch.float64)
    w = torch.randn_like(z)
    u64 = m64(z, r, t, y)
    g64 = torch.autograd.grad((u64 * w).sum(), list(m64.parameters()))
    runs = {}
    for backend in ("torch", "triton"):
        model = MeanFlowDiT(m64.config, backend=backend)
        model.load_state_dict(m64.state_dict())
        model = model.to(device, dtype)
        u = model(z.to(device, dtype), r.to(device), t.to(device), y.to(device))
        assert u.dtype == dtype and u.shape == z.shape
        g = torch.autograd.grad((u.float() * w.to(device)).sum(), list(model.parameters()))
        runs[backend] = [rel_err(u.cpu(), u64)] + [rel_err(a.cpu(), b) for a, b in zip(g, g64)]
    names = ["u"] + [n for n, _ in m64.named_parameters()]
    for name, err, err_torch in zip(names, runs["triton"], runs["torch"]):
        tol = 2 * err_torch + FWD_FLOOR[dtype]
        assert err <= tol, f"{name}: triton rel err {err:.3g} > tol {tol:.3g} (torch: {err_torch:.3g})"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only: the interpreter switch")
def test_model_forward_backend_picks_the_kernels(monkeypatch):
    """backend="triton" really runs the Triton kernels (they refuse CPU tensors without the interpreter),
    whether set on the model or passed to forward; backend="torch" (the default) never touches them."""
    model = _model(torch.float32)
    z, r, t, y, _ = _inputs(model, 2, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    u = model(z, r, t, y)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        model(z, r, t, y, backend="triton")
    model.backend = "triton"
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        model(z, r, t, y)
    assert torch.equal(model(z, r, t, y, backend="torch"), u)
    with pytest.raises(ValueError, match="backend must be one of"):
        model(z, r, t, y, backend="cuda")


def test_model_forward_triton_saves_less_than_torch():
    """The fused primal ops keep x and (8 bytes a row of) statistics, the MLP its pre-activation only
    (h = gelu(a) is recomputed in its backward): measured 0.76× of the torch forward here."""
    model = randomize_(meanflow_dit("tiny", input_size=16, hidden_size=64, num_heads=2, depth=2), std=0.1)
    z, r, t, y, _ = _inputs(model, 4, torch.float32)
    assert _saved_bytes(lambda: model(z, r, t, y, backend="triton")) <= 0.8 * _saved_bytes(lambda: model(z, r, t, y))


# ------------------------------------------------------------------------------- memory for backward
def _saved_bytes(fn):
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("backend,limit", [("torch", 1.15), ("triton", 1.0)])
def test_forward_jvp_saves_no_more_than_the_forward(backend, limit):
    """Nothing of the tangent stream is kept for backward: forward_jvp saves about what the plain
    forward saves (the torch reference also keeps each softmax matrix P; the fused path keeps less
    than eager: measured 1.07× and 0.76× here). Keeping the tangent graph would roughly double it."""
    model = randomize_(meanflow_dit("tiny", input_size=16, hidden_size=64, num_heads=2, depth=2), std=0.1)
    z, r, t, y, dz = _inputs(model, 4, torch.float32)
    fwd = _saved_bytes(lambda: model(z, r, t, y))
    jvp = _saved_bytes(lambda: model.forward_jvp(z, r, t, y, dz, backend=backend))
    print(f"saved for backward: forward {fwd / 2**20:.2f} MiB, forward_jvp[{backend}] {jvp / 2**20:.2f} MiB")
    assert jvp <= limit * fwd


# ------------------------------------------------------------------------------- forward mode over the triton forward
def test_func_jvp_over_triton_forward():
    """torch.func.jvp over the plain forward with backend="triton" (fused primal ops whose Functions
    define jvp via the dual kernels) equals forward_jvp on the torch backend; and MeanFlowLoss with
    jvp="func" (that path) gives the same loss and parameter gradients as jvp="auto" (forward_jvp)."""
    m = _model(torch.float32, input_size=8, hidden_size=64, num_heads=2)  # head dim 32
    m.backend = "triton"
    z, r, t, y, dz = _inputs(m, 3, torch.float32)
    u, dudt = func_jvp(lambda z_, r_, t_: m(z_, r_, t_, y), (z, r, t),
                       (dz, torch.zeros_like(r), torch.ones_like(t)))
    u_ref, dudt_ref = m.forward_jvp(z, r, t, y, dz, backend="torch")
    assert rel_err(u, u_ref) <= 1e-5 and rel_err(dudt, dudt_ref) <= 1e-5

    x = torch.randn_like(z)
    results = {}
    for jvp in ("func", "auto"):
        m.zero_grad(set_to_none=True)
        loss_fn = MeanFlowLoss(num_classes=m.config.num_classes, jvp=jvp, omega=0.7, kappa=0.2)
        loss, _ = loss_fn(m, x, y.clamp(max=m.config.num_classes - 1), generator=torch.Generator().manual_seed(3))
        loss.backward()
        results[jvp] = loss.detach(), torch.cat([p.grad.flatten() for p in m.parameters()])
    assert rel_err(results["func"][0], results["auto"][0]) <= 1e-5
    assert rel_err(results["func"][1], results["auto"][1]) <= 1e-4


def test_triton_backward_of_forward_jvp_is_lean():
    """The backward of forward_jvp on the fused path runs the kernels' backwards and cuBLAS matmuls with
    no zero-filled gradient for any tangent output (autograd would make one per op, activation-sized,
    if the Functions materialised gradients) and no stack/copy of the packed qkv gradient. Every gated
    residual is fused with the LayerNorm-modulate after it, whose backward adds the residual stream's
    two gradients itself: autograd's activation-sized add runs once (the patch embedding feeds the
    first LayerNorm and the first residual), not once per residual. Top-level ops of the backward that
    make activation-sized (≥ 3-D) tensors, logged by a dispatch mode."""
    m = _model(torch.float32, input_size=8, hidden_size=64, num_heads=2)
    m.backend = "triton"
    z, r, t, y, dz = _inputs(m, 2, torch.float32)
    u, _ = m.forward_jvp(z, r, t, y, dz)
    with OpLog() as log:
        (u * torch.randn_like(u)).sum().backward()
    depth = len(m.blocks)
    assert {"meanflow_fast.attn_bwd_qkv", "meanflow_fast.ln_modulate_bwd"} <= log.big, log.big
    assert log.big_calls.get("meanflow_fast.gated_residual_ln_bwd") == 2 * depth, log.big_calls
    assert log.big_calls.get("meanflow_fast.ln_modulate_bwd") == 1, log.big_calls
    assert log.big_calls.get("aten.add") == 1, log.big_calls
    wasteful = {"aten.zeros", "aten.zeros_like", "aten.new_zeros", "aten.fill_", "aten.stack", "aten.cat"}
    assert not wasteful & log.big, wasteful & log.big


def test_triton_backward_of_plain_forward_is_lean():
    """The plain forward with backend="triton" chains its blocks as forward_jvp does: every gated
    residual fused with the LayerNorm-modulate after it, so its backward runs 2 × depth fused backwards,
    the first LayerNorm-modulate's alone, and autograd's activation-sized add once (the patch
    embedding's two consumers), not once per residual."""
    m = _model(torch.float32, input_size=8, hidden_size=64, num_heads=2)
    z, r, t, y, _ = _inputs(m, 2, torch.float32)
    u = m(z, r, t, y, backend="triton")
    with OpLog() as log:
        (u * torch.randn_like(u)).sum().backward()
    depth = len(m.blocks)
    assert log.big_calls.get("meanflow_fast.gated_residual_ln_bwd") == 2 * depth, log.big_calls
    assert log.big_calls.get("meanflow_fast.ln_modulate_bwd") == 1, log.big_calls
    assert "meanflow_fast.gated_residual_bwd" not in log.big_calls, log.big_calls
    assert log.big_calls.get("aten.add") == 1, log.big_calls


def test_func_jvp_on_torch_backend_needs_no_sdpa_context():
    """torch.func.jvp over the plain forward of a torch-backend model works without an SDPA context (under
    forward AD the attention takes the math path: the fused SDPA kernels have no JVP rule) and gives
    forward_jvp's (u, du/dt)."""
    import torch

    from meanflow_fast import meanflow_dit
    from tests.helpers import randomize_, rel_err
    torch.manual_seed(0)
    m = randomize_(meanflow_dit("tiny")).eval()
    c = m.config
    z = torch.randn(2, c.in_channels, c.input_size, c.input_size)
    dz = torch.randn_like(z)
    y, t, r = torch.tensor([0, 3]), torch.tensor([0.7, 0.4]), torch.tensor([0.2, 0.4])
    with torch.no_grad():
        u, du = torch.func.jvp(lambda z_, r_, t_: m(z_, r_, t_, y), (z, r, t),
                               (dz, torch.zeros_like(r), torch.ones_like(t)))
        u_ref, du_ref = m.forward_jvp(z, r, t, y, dz)
    assert rel_err(u, u_ref) <= 1e-5 and rel_err(du, du_ref) <= 1e-5, (rel_err(u, u_ref), rel_err(du, du_ref))
