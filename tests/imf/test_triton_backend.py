"""IMFDiT with backend="triton" (the fused iMF kernels; in Triton's interpreter on the CPU) against
backend="torch" (the ``*_ref`` references beside each kernel): the plain forward for each ``heads``,
forward_jvp (u, u̇, v), parameter gradients through u (forward_jvp) and v (forward heads="v"), IMFLoss on
explicit draws, the chained structure (each gated residual fused with the next RMSNorm), torch.compile,
and bf16 on a GPU.

Tolerance rule (as tests/test_model.py's triton-vs-torch tests): at the same precision, the triton
model's relative error against the fp64 torch model is at most 2× the torch model's own + a floor.
Every parameter is random (gates, final layers and norm weights included): the zero init would make
every block the identity and u = v = 0."""
import pytest
import torch

from meanflow_fast.imf import IMFDiT, imf_dit
from meanflow_fast.imf.loss import IMFLoss
from tests.helpers import HAS_CUDA, OpLog, assert_within_torch, randomize_, rel_err, requires_cuda
from tests.imf.test_model import official_forward

F64 = torch.float64
DEVICE = "cuda" if HAS_CUDA else "cpu"
FLOOR = {torch.float32: 1e-7, torch.float16: 1e-4}  # ~1 and ~0.2 unit roundoffs (tests/test_model.py)
# tiny: head dim 32, 20 + 16 = 36 tokens, 2 trunk blocks + 1 per head. hd64: the presets' head dim 64,
# 20 + 9 = 29 tokens, SwiGLU hidden 341, one block in the trunk and in each head.
CONFIGS = {"tiny": {}, "hd64": dict(input_size=6, depth=2, head_depth=1, hidden_size=128, num_heads=2)}


def _model64(config: str, std: float = 0.15) -> IMFDiT:
    return randomize_(imf_dit("tiny", **CONFIGS[config]), std=std).to(DEVICE, F64)


def _inputs(model, B):
    """(z, t, h, ω, t_min, t_max, y) in fp64, the null label included."""
    c = model.config
    kw = dict(dtype=F64, device=DEVICE)
    z = torch.randn(B, c.in_channels, c.input_size, c.input_size, **kw)
    t = torch.rand(B, **kw)
    y = torch.randint(0, c.num_classes + 1, (B,), device=DEVICE)
    return z, t, t * torch.rand(B, **kw), 1 + 6 * torch.rand(B, **kw), 0.5 * torch.rand(B, **kw), \
        0.5 + 0.5 * torch.rand(B, **kw), y


def _cast(args, dtype):
    return [a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]


def _copies(m64, dtype):
    """The fp64 model's weights in ``dtype`` on each backend."""
    out = {}
    for backend in ("torch", "triton"):
        m = IMFDiT(m64.config, backend=backend).to(DEVICE)
        m.load_state_dict(m64.state_dict())
        out[backend] = m.to(dtype)
    return out


def _grads(loss, model):
    return torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


def _assert_grads(g_triton, g_torch, g64, model, floor):
    """Per parameter: the same ones get a gradient, and the triton one within the rule."""
    for (name, _), a, b, ref in zip(model.named_parameters(), g_triton, g_torch, g64):
        assert (a is None) == (b is None) == (ref is None), name
        if ref is not None:
            assert_within_torch(name, a.float(), b.float(), ref, atol=floor)


# =================================================================================================
#                                  Plain forward, each head
# =================================================================================================
@pytest.mark.parametrize("config,dtype", [("tiny", torch.float32), ("tiny", torch.float16),
                                          ("hd64", torch.float32)])
def test_forward_matches_torch(config, dtype):
    """u and v for heads "both", "u", "v"; parameter gradients through v of heads="v" (the v-head's
    blocks and the trunk get them, the u-head none)."""
    m64 = _model64(config)
    args = _inputs(m64, 2)
    w = torch.randn_like(args[0])
    u64, v64 = m64(*args)
    g64 = _grads((m64(*args, heads="v") * w).sum(), m64)
    models, runs = _copies(m64, dtype), {}
    for backend, m in models.items():
        a = _cast(args, dtype)
        with torch.no_grad():
            u, v = m(*a)
            u_only = m(*a, heads="u")
        v_only = m(*a, heads="v")
        assert u.dtype == v.dtype == dtype and u.shape == v.shape == args[0].shape
        runs[backend] = (u, v, u_only, v_only, _grads((v_only.float() * w).sum(), m))
    floor = FLOOR[dtype]
    for i, (what, ref) in enumerate([("u (both)", u64), ("v (both)", v64), ("u (heads=u)", u64),
                                     ("v (heads=v)", v64)]):
        assert_within_torch(what, runs["triton"][i].float(), runs["torch"][i].float(), ref, atol=floor)
    _assert_grads(runs["triton"][4], runs["torch"][4], g64, m64, 10 * floor)
    assert runs["triton"][4][[n for n, _ in m64.named_parameters()].index("u_blocks.0.mlp.w1.weight")] is None


# =================================================================================================
#                         forward_jvp: u, u̇, v and the gradients through them
# =================================================================================================
@pytest.mark.parametrize("config,dtype", [("tiny", torch.float32), ("tiny", torch.float16),
                                          ("hd64", torch.float32), ("hd64", torch.float16)])
def test_forward_jvp_matches_torch(config, dtype):
    """(u, u̇, v) along a random (dz, dh), and every parameter's gradient of a loss on u and v; u̇ has no
    graph."""
    m64 = _model64(config)
    args = _inputs(m64, 2)
    dz, dh = torch.randn_like(args[0]), torch.randn(2, dtype=F64, device=DEVICE)
    wu, wv = torch.randn_like(dz), torch.randn_like(dz)
    loss = lambda u_, v_: (u_.float() * wu).sum() + (v_.float() * wv).sum()  # noqa: E731
    ref = m64.forward_jvp(*args, dz, dh=dh)
    g64 = _grads(loss(ref[0], ref[2]), m64)
    assert ref[1].abs().max() > 1e-2  # a non-trivial tangent
    runs = {}
    for backend, m in _copies(m64, dtype).items():
        u, u_dot, v = m.forward_jvp(*_cast(args, dtype), dz.to(dtype), dh=dh.to(dtype))
        assert u.dtype == u_dot.dtype == v.dtype == dtype and u_dot.grad_fn is None
        runs[backend] = (u, u_dot, v, _grads(loss(u, v), m))
    for i, what in enumerate(("u", "u_dot", "v")):
        assert_within_torch(what, runs["triton"][i].float(), runs["torch"][i].float(), ref[i], atol=FLOOR[dtype])
    _assert_grads(runs["triton"][3], runs["torch"][3], g64, m64, 10 * FLOOR[dtype])


# =================================================================================================
#                                 IMFLoss on the triton model
# =================================================================================================
@pytest.mark.parametrize("jvp", ["auto", "func"])
def test_imf_loss_matches_torch(jvp):
    """IMFLoss on explicit draws (a flow-matching row, t inside and outside [t_min, t_max], a dropped label):
    loss, loss_u, loss_v and every parameter gradient of the fp32 triton model within the rule of the fp32
    torch model, against the fp64 torch model. "auto" runs forward_jvp (dual kernels), "func"
    torch.func.jvp over the triton forward (the primal kernels' forward-mode rule)."""
    m64 = _model64("hd64", std=0.2)
    B = 3
    c = m64.config
    x = torch.randn(B, c.in_channels, c.input_size, c.input_size, dtype=F64, device=DEVICE)
    y = torch.randint(0, c.num_classes, (B,), device=DEVICE)
    kw = lambda dt: dict(  # noqa: E731
        t=torch.tensor([0.7, 0.5, 0.2], dtype=dt, device=DEVICE),
        r=torch.tensor([0.7, 0.1, 0.05], dtype=dt, device=DEVICE),
        omega=torch.tensor([1.0, 2.5, 6.0], dtype=dt, device=DEVICE),
        t_min=torch.tensor([0.0, 0.3, 0.3], dtype=dt, device=DEVICE),
        t_max=torch.tensor([1.0, 0.65, 0.65], dtype=dt, device=DEVICE),
        drop=torch.tensor([False, False, True], device=DEVICE))
    noise = torch.randn_like(x)
    loss_fn = IMFLoss(jvp=jvp)
    loss64, stats64 = loss_fn(m64, x, y, noise=noise, **kw(F64))
    g64 = _grads(loss64, m64)
    runs = {}
    for backend, m in _copies(m64, torch.float32).items():
        loss, stats = loss_fn(m, x.float(), y, noise=noise.float(), **kw(torch.float32))
        runs[backend] = (loss, stats, _grads(loss, m))
    for key in ("loss_u", "loss_v"):
        assert_within_torch(key, runs["triton"][1][key], runs["torch"][1][key], stats64[key], atol=1e-7)
    assert_within_torch("loss", runs["triton"][0], runs["torch"][0], loss64, atol=1e-7)
    _assert_grads(runs["triton"][2], runs["torch"][2], g64, m64, 1e-6)


# =================================================================================================
#               Structure: the kernels run, each residual fused with the next RMSNorm
# =================================================================================================
def _calls(log, name):
    return log.ops.count(f"meanflow_fast.{name}")


def test_triton_backend_runs_the_fused_chain():
    """tiny: 2 trunk blocks, 1 u-block, 1 v-block. forward_jvp: the trunk and u-head on the dual kernels,
    every residual fused with the RMSNorm after it (2 per block), one RMSNorm alone (the trunk's first);
    the v-head on the primal kernels, its first RMSNorm alone. The backward runs the fused backwards,
    never an unfused residual. The plain forward chains the same way."""
    m = randomize_(imf_dit("tiny"), std=0.15).to(DEVICE)
    m.backend = "triton"
    args = _cast(_inputs(m, 1), torch.float32)
    with OpLog() as log:
        u, _, v = m.forward_jvp(*args, torch.randn_like(args[0]))
    assert _calls(log, "gated_residual_rmsnorm_fwd") == 2 * 3 and _calls(log, "rms_norm_fwd") == 1
    assert _calls(log, "gated_residual_rmsnorm_primal_fwd") == 2 and _calls(log, "rms_norm_primal_fwd") == 1
    assert _calls(log, "qk_norm_rope_fwd") == 3 and _calls(log, "qk_norm_rope_primal_fwd") == 1
    assert _calls(log, "attn_fwd_jvp") == 3 and _calls(log, "swiglu_gate_fwd") == 3
    assert _calls(log, "swiglu_gate_primal_fwd") == 1
    assert _calls(log, "dual_linear_fwd") == 4 * 3 + 3 + 1  # q, k, v, out; SwiGLU's W2; the final linear
    assert "aten.rsqrt" not in log.ops and "aten.silu" not in log.big  # no reference RMSNorm or SwiGLU
    with OpLog() as log:
        (u.sum() + v.sum()).backward()
    assert _calls(log, "gated_residual_rmsnorm_bwd") == 2 * 4 and _calls(log, "rms_norm_bwd") == 2
    assert _calls(log, "qk_norm_rope_bwd") == 4 and _calls(log, "attn_bwd") == 3

    with OpLog() as log:
        m(*args)
    assert _calls(log, "gated_residual_rmsnorm_primal_fwd") == 2 * 4 and _calls(log, "rms_norm_primal_fwd") == 2
    assert _calls(log, "qk_norm_rope_primal_fwd") == 4 and _calls(log, "swiglu_gate_primal_fwd") == 4
    assert "aten.rsqrt" not in log.ops and "aten.silu" not in log.big


@pytest.mark.parametrize("depths", [dict(depth=1, head_depth=0), dict(depth=1, head_depth=1)])
def test_chain_with_an_empty_trunk_or_empty_heads(depths):
    """The chain's ends: heads without blocks (the trunk's last residual fused with a final layer's norm)
    and a trunk without blocks (the embedding goes straight into a head's first norm). The fp64 torch
    model equals the transcription of the official forward (tests/imf/test_model.py); fp32 triton follows
    the rule for forward (heads "both") and forward_jvp."""
    m64 = randomize_(imf_dit("tiny", **depths), std=0.15).to(DEVICE, F64)
    args = _inputs(m64, 2)
    dz = torch.randn_like(args[0])
    with torch.no_grad():
        ref = (*m64(*args), *m64.forward_jvp(*args, dz))
        official = official_forward(m64, *args)
    assert rel_err(ref[0], official[0]) <= 1e-12 and rel_err(ref[1], official[1]) <= 1e-12
    runs = {}
    for backend, m in _copies(m64, torch.float32).items():
        a = _cast(args, torch.float32)
        with torch.no_grad():
            runs[backend] = (*m(*a), *m.forward_jvp(*a, dz.float()))
    for i, what in enumerate(("u", "v", "u (jvp)", "u_dot", "v (jvp)")):
        assert_within_torch(what, runs["triton"][i], runs["torch"][i], ref[i], atol=FLOOR[torch.float32])


# =================================================================================================
#                                        torch.compile
# =================================================================================================
@pytest.mark.skipif(HAS_CUDA, reason="CPU-side compile check (on a GPU: test_bf16_compiled_forward_on_gpu)")
def test_compiled_triton_forward_fullgraph_equals_eager():
    """The plain forward (heads="u") on the primal kernels under torch.compile: one graph (no break around
    a custom op), their fake shapes and registered backwards, the same u and parameter gradients as
    eager. aot_eager: inductor's C++ code generation would add ~30 s on one core here; the GPU test
    compiles with inductor."""
    torch._dynamo.reset()
    m = randomize_(imf_dit("tiny", depth=2, head_depth=1), std=0.15)
    m.backend = "triton"
    args = _cast(_inputs(m, 2), torch.float32)
    w = torch.randn_like(args[0])
    u = m(*args, heads="u")
    g = _grads((u * w).sum(), m)
    uc = torch.compile(m, backend="aot_eager", fullgraph=True)(*args, heads="u")
    gc = _grads((uc * w).sum(), m)
    assert rel_err(uc, u) <= 1e-6
    for (name, _), a, b in zip(m.named_parameters(), gc, g):
        assert (a is None) == (b is None), name
        if a is not None:
            assert rel_err(a, b) <= 1e-5, name


# =================================================================================================
#                                      bf16 on a GPU
# =================================================================================================
def _gpu_case(B=2):
    """B/2's shapes (head dim 64, 276 tokens, 1000 classes) with one block in the trunk and each head."""
    m = randomize_(imf_dit("B/2", depth=2, head_depth=1), std=0.05).cuda()
    args = _inputs(m, B)
    return m, _cast(args, torch.float32), torch.randn_like(args[0], dtype=torch.float32)


@requires_cuda
def test_bf16_forward_and_forward_jvp_on_gpu():
    """bf16 triton vs bf16 torch against the fp32 torch model: u, u̇, v, the plain forward's (u, v), and
    the parameter gradients through forward_jvp's u and v."""
    m32, args, dz = _gpu_case()
    wu, wv = torch.randn_like(dz), torch.randn_like(dz)
    loss = lambda u_, v_: (u_.float() * wu).sum() + (v_.float() * wv).sum()  # noqa: E731
    ref = m32.forward_jvp(*args, dz)
    g32 = torch.cat([g.flatten() for g in _grads(loss(ref[0], ref[2]), m32)])
    with torch.no_grad():
        ref_fwd = m32(*args)
    runs = {}
    for backend in ("torch", "triton"):
        m = IMFDiT(m32.config, backend=backend).cuda()
        m.load_state_dict(m32.state_dict())
        m = m.to(torch.bfloat16)
        a = _cast(args, torch.bfloat16)
        u, u_dot, v = m.forward_jvp(*a, dz.bfloat16())
        g = torch.cat([g.flatten() for g in _grads(loss(u, v), m)])
        with torch.no_grad():
            fwd = m(*a)
        runs[backend] = (u, u_dot, v, *fwd, g)
    refs = (*ref, *ref_fwd, g32)
    for i, what in enumerate(("u", "u_dot", "v", "u (forward)", "v (forward)", "grad")):
        assert_within_torch(what, runs["triton"][i].float(), runs["torch"][i].float(), refs[i],
                            atol=1e-2 if what == "grad" else 1e-3)


@requires_cuda
def test_bf16_autocast_forward_jvp_on_gpu():
    """fp32 weights under bf16 autocast (the kernels get bf16 inputs, RoPE's tables stay fp32): triton
    within the rule of the torch backend under the same autocast, against fp32."""
    m32, args, dz = _gpu_case()
    ref = m32.forward_jvp(*args, dz)
    runs = {}
    for backend in ("torch", "triton"):
        m32.backend = backend
        with torch.autocast("cuda", dtype=torch.bfloat16):
            runs[backend] = m32.forward_jvp(*args, dz)
    m32.backend = "torch"
    for i, what in enumerate(("u", "u_dot", "v")):
        assert_within_torch(what, runs["triton"][i].float(), runs["torch"][i].float(), ref[i], atol=1e-3)


@requires_cuda
def test_bf16_compiled_forward_on_gpu():
    """torch.compile over the bf16 triton forward and forward_jvp equals eager."""
    m32, args, dz = _gpu_case()
    m = m32.to(torch.bfloat16)
    m.backend = "triton"
    a, dzb = _cast(args, torch.bfloat16), dz.bfloat16()
    with torch.no_grad():
        u, v = m(*a)
        uc, vc = torch.compile(m)(*a)
        j = m.forward_jvp(*a, dzb)
        jc = torch.compile(m.forward_jvp)(*a, dzb)
    assert rel_err(uc, u) <= 1e-2 and rel_err(vc, v) <= 1e-2
    for x, xc in zip(j, jc):
        assert rel_err(xc, x) <= 1e-2
