"""The iMF DiT (meanflow_fast/imf/model.py): presets and parameter counts, the plain forward against a
transcription of the official forward, the explicit forward_jvp against torch.func.jvp, the heads,
gradients, and bad configs (the checks of a call's inputs: test_model_inputs.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from meanflow_fast.imf import IMF_PRESETS, IMFConfig, IMFDiT, imf_dit
from tests.helpers import randomize_, rel_err

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
F64 = torch.float64


def _model(preset="tiny", dtype=F64, std=0.15, **kw):
    """A preset with every parameter random (gates, final layers and norms included: the zero init would
    hide tangent bugs)."""
    return randomize_(imf_dit(preset, **kw), std=std).to(dtype)


def _inputs(model, B, dtype):
    c = model.config
    z = torch.randn(B, c.in_channels, c.input_size, c.input_size, dtype=dtype)
    t = torch.rand(B, dtype=dtype)
    h = t * torch.rand(B, dtype=dtype)
    omega = 1 + 6 * torch.rand(B, dtype=dtype)
    t_min, t_max = 0.5 * torch.rand(B, dtype=dtype), 0.5 + 0.5 * torch.rand(B, dtype=dtype)
    y = torch.randint(0, c.num_classes + 1, (B,))  # the null label included
    return z, t, h, omega, t_min, t_max, y


# =================================================================================================
#                                          Presets
# =================================================================================================
# Parameter counts of the official imfDiT at 32×32×4 latents and 1000 classes, with the v-head and in its
# inference layout (no v-head blocks), in millions (the figures, counted from the official module).
OFFICIAL_PARAMS = {"B/2": (145.6, 88.9), "M/2": (230.6, 173.9), "L/2": (509.8, 409.1), "XL/2": (711.1, 610.4)}


@pytest.mark.parametrize("preset", sorted(OFFICIAL_PARAMS))
def test_preset_parameter_counts(preset):
    with torch.device("meta"):
        counts = [sum(p.numel() for p in imf_dit(preset, v_head=v).parameters()) / 1e6 for v in (True, False)]
    for got, want in zip(counts, OFFICIAL_PARAMS[preset]):
        assert abs(got - want) <= 0.05, f"{preset}: {got:.2f}M vs official {want}M"


@pytest.mark.parametrize("preset,depth,width,heads,mlp", [("B/2", 12, 768, 12, 2048), ("M/2", 24, 768, 12, 2048),
                                                          ("L/2", 32, 1024, 16, 2730), ("XL/2", 48, 1024, 16, 2730)])
def test_preset_structure(preset, depth, width, heads, mlp):
    """Head dim 64, 20 prefix + 256 patch tokens, SwiGLU hidden int(8/3·width), trunk = depth − 8."""
    with torch.device("meta"):
        model = imf_dit(preset)
    c = model.config
    assert (c.depth, c.hidden_size, c.num_heads, c.head_depth) == (depth, width, heads, 8)
    assert width // heads == 64 and c.prefix_tokens == 20 and c.num_tokens == 276
    assert model.trunk[0].mlp.w1.weight.shape == (mlp, width)
    assert (len(model.trunk), len(model.u_blocks), len(model.v_blocks)) == (depth - 8, 8, 8)


def _count_by_hand(D, heads, blocks, channels, classes=10, freq=None, patch=2):
    """Parameters of the architecture counted from its description: four scalar embedders (F → D → D, with
    biases), the label table (classes + 1 rows), 20 prefix tokens, the patch conv with bias, blocks (q, k,
    v, out D×D; SwiGLU 3·D·int(8D/3); RMSNorm weights 2·D + 2·D_h; two (D,) gates), two final layers
    (RMSNorm weight, linear D → p²C with bias)."""
    M, out = int(D * 8 / 3), patch * patch * channels
    embedders = 4 * (freq * D + D + D * D + D)
    block = 4 * D * D + 3 * D * M + 2 * D + 2 * (D // heads) + 2 * D
    return (embedders + (classes + 1) * D + 20 * D + channels * patch * patch * D + D + blocks * block
            + 2 * (D + D * out + out))


@pytest.mark.parametrize("name,D,heads,channels,freq", [("tiny", 64, 2, 4, 32), ("digits", 96, 3, 1, 64)])
def test_small_presets(name, D, heads, channels, freq):
    for v_head, blocks in ((True, 4), (False, 3)):  # 2 trunk + 1 u-head (+ 1 v-head) blocks
        model = imf_dit(name, v_head=v_head)
        c = model.config
        assert (c.num_classes, c.input_size, c.in_channels, c.hidden_size, c.num_heads) == (10, 8, channels, D, heads)
        assert sum(p.numel() for p in model.parameters()) == _count_by_hand(D, heads, blocks, channels, freq=freq)
    if name == "digits":  # sized like the DiT's digits preset (~0.5M parameters)
        assert 0.45e6 < sum(p.numel() for p in imf_dit(name).parameters()) < 0.55e6


# =================================================================================================
#                          Plain forward vs the official forward, written out
# =================================================================================================
def official_forward(model, z, t, h, omega, t_min, t_max, y):
    """The official imfDiT forward transcribed with plain torch ops on the model's parameters: prefix
    tokens (class, ω from 1 − 1/ω, t_min, t_max, time from h) before the patches, pre-RMSNorm blocks with
    gates, QK-RMSNorm, RoPE as complex products of adjacent pairs, softmax(q·kᵀ/√D_h), SwiGLU; trunk, then
    each head and its final layer on the patch tokens."""
    c, B = model.config, z.shape[0]
    D, H = c.hidden_size, c.num_heads
    Dh = D // H

    def scalar(embedder, s):
        half = c.freq_dim // 2
        freqs = torch.exp(-math.log(c.max_period) * torch.arange(half, dtype=z.dtype) / half)
        a = s[:, None] * freqs
        e = torch.cat([torch.cos(a), torch.sin(a)], -1)
        lin0, lin2 = embedder.mlp[0], embedder.mlp[2]
        return F.silu(e @ lin0.weight.T + lin0.bias) @ lin2.weight.T + lin2.bias

    def rms(x, w):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * w

    x = F.conv2d(z, model.x_embedder.weight, model.x_embedder.bias, stride=c.patch_size)
    x = x.permute(0, 2, 3, 1).reshape(B, -1, D)
    seq = torch.cat([model.class_tokens + model.y_embedder.embedding_table.weight[y][:, None],
                     model.omega_tokens + scalar(model.omega_embedder, 1 - 1 / omega)[:, None],
                     model.t_min_tokens + scalar(model.t_min_embedder, t_min)[:, None],
                     model.t_max_tokens + scalar(model.t_max_embedder, t_max)[:, None],
                     model.time_tokens + scalar(model.h_embedder, h)[:, None], x], dim=1)
    L = seq.shape[1]
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, Dh, 2, dtype=z.dtype) / Dh))
    ang = torch.arange(L, dtype=z.dtype)[:, None] * inv
    rot = torch.polar(torch.ones_like(ang), ang)[None, :, None, :]  # (1, L, 1, Dh/2)

    def rope(q):
        return torch.view_as_real(torch.view_as_complex(q.reshape(B, L, H, Dh // 2, 2)) * rot).reshape(B, L, H, Dh)

    def block(b, x):
        a = rms(x, b.norm1.weight)
        q, k, v = ((a @ p.weight.T).reshape(B, L, H, Dh) for p in (b.attn.q_proj, b.attn.k_proj, b.attn.v_proj))
        q, k = rope(rms(q, b.attn.q_norm.weight)), rope(rms(k, b.attn.k_norm.weight))
        att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q / math.sqrt(Dh), k), dim=-1)
        o = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, L, D) @ b.attn.out_proj.weight.T
        x = x + o * b.attn_gate
        a = rms(x, b.norm2.weight)
        m = (F.silu(a @ b.mlp.w1.weight.T) * (a @ b.mlp.w3.weight.T)) @ b.mlp.w2.weight.T
        return x + m * b.mlp_gate

    def head(x, blocks, final):
        for b in blocks:
            x = block(b, x)
        out = rms(x[:, c.prefix_tokens:], final.norm.weight) @ final.linear.weight.T + final.linear.bias
        g, p = c.input_size // c.patch_size, c.patch_size
        out = out.reshape(B, g, g, p, p, c.in_channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(B, c.in_channels, g * p, g * p)

    for b in model.trunk:
        seq = block(b, seq)
    return head(seq, model.u_blocks, model.u_final), head(seq, model.v_blocks, model.v_final)


@pytest.mark.parametrize("preset,kw", [("tiny", {}), ("digits", {}),
                                       ("B/2", dict(depth=3, head_depth=1, hidden_size=128, num_heads=2))])
def test_forward_matches_official_transcription(preset, kw):
    model = _model(preset, **kw)
    args = _inputs(model, 3, F64)
    with torch.no_grad():
        u, v = model(*args)
        u_ref, v_ref = official_forward(model, *args)
    assert u.shape == v.shape == args[0].shape
    assert rel_err(u, u_ref) <= 1e-12 and rel_err(v, v_ref) <= 1e-12


def test_t_is_not_an_input_and_conditions_matter():
    """u depends on h, ω, t_min, t_max and y, not on t (the official model conditions on h = t − r only)."""
    model = _model("tiny")
    z, t, h, omega, t_min, t_max, y = _inputs(model, 2, F64)
    with torch.no_grad():
        u = model(z, t, h, omega, t_min, t_max, y, heads="u")
        assert torch.equal(u, model(z, torch.ones_like(t), h, omega, t_min, t_max, y, heads="u"))
        for changed in (dict(h=h / 2), dict(omega=omega + 1), dict(t_min=t_min / 2), dict(t_max=(1 + t_max) / 2),
                        dict(y=(y + 1) % 11)):
            args = dict(z=z, t=t, h=h, omega=omega, t_min=t_min, t_max=t_max, y=y, heads="u")
            args.update(changed)
            assert rel_err(model(**args), u) > 1e-6, changed


# =================================================================================================
#                            forward_jvp against torch.func.jvp
# =================================================================================================
def _check_forward_jvp(model, B, dtype, dt=None, dh=None):
    z, t, h, omega, t_min, t_max, y = _inputs(model, B, dtype)
    dz = torch.randn_like(z)
    dt = torch.randn(B, dtype=dtype) if dt is None else dt
    dh = torch.randn(B, dtype=dtype) if dh is None else dh
    u, u_dot, v = model.forward_jvp(z, t, h, omega, t_min, t_max, y, dz, dt=dt, dh=dh)
    as_b = lambda s: torch.as_tensor(s, dtype=dtype).expand(B)  # noqa: E731
    u_ref, u_dot_ref = torch.func.jvp(lambda z_, t_, h_: model(z_, t_, h_, omega, t_min, t_max, y, heads="u"),
                                      (z, t, h), (dz, as_b(dt), as_b(dh)))
    assert u.shape == u_dot.shape == v.shape == z.shape
    assert u_dot_ref.abs().max() > 1e-3  # a non-trivial tangent
    assert rel_err(u, u_ref) <= TOL[dtype], rel_err(u, u_ref)
    assert rel_err(u_dot, u_dot_ref) <= TOL[dtype], rel_err(u_dot, u_dot_ref)
    with torch.no_grad():
        v_ref = model(z, t, h, omega, t_min, t_max, y, heads="v")
    assert rel_err(v, v_ref) <= TOL[dtype]
    return u_dot


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("preset,B", [("tiny", 1), ("tiny", 3), ("digits", 2)])
def test_forward_jvp_matches_func_jvp(preset, B, dtype):
    _check_forward_jvp(_model(preset, dtype), B, dtype)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("preset", ["B/2", "M/2", "L/2", "XL/2"])
def test_forward_jvp_big_preset_structure(preset, dtype):
    """Each big preset as it is (32×32×4 latents: 20 prefix + 256 patch tokens, head dim 64, 1000 classes,
    freq dim 256) but with 2 trunk blocks + 1 per head and width 128 (2 heads) instead of its own."""
    model = _model(preset, dtype, std=0.1, depth=3, head_depth=1, hidden_size=128, num_heads=2)
    assert model.config.num_tokens == 276 and model.config.num_classes == 1000
    _check_forward_jvp(model, 2, dtype)


def test_forward_jvp_directions():
    """dt leaves u̇ unchanged (t is not an input); scalar and per-sample tangents agree; dz = 0, dh = 1 is ∂u/∂h."""
    model = _model("tiny")
    z, t, h, omega, t_min, t_max, y = _inputs(model, 3, F64)
    dz = torch.randn_like(z)
    jvp = lambda **kw: model.forward_jvp(z, t, h, omega, t_min, t_max, y, **kw)[1]  # noqa: E731
    assert torch.equal(jvp(dz=dz, dt=0.0, dh=1.0), jvp(dz=dz, dt=torch.full((3,), 5.0, dtype=F64), dh=1.0))
    assert torch.equal(jvp(dz=dz, dh=torch.tensor(0.7, dtype=F64)), jvp(dz=dz, dh=torch.full((3,), 0.7, dtype=F64)))
    _, dudh = torch.func.jvp(lambda h_: model(z, t, h_, omega, t_min, t_max, y, heads="u"), (h,),
                             (torch.ones_like(h),))
    assert rel_err(jvp(dz=torch.zeros_like(z)), dudh) <= 1e-10
    _check_forward_jvp(model, 3, F64, dt=2.0, dh=torch.tensor(-0.5, dtype=F64))


def test_forward_jvp_fp32_close_to_fp64():
    m64 = _model("tiny")
    m32 = IMFDiT(m64.config)
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    args = _inputs(m64, 2, F64)
    dz = torch.randn_like(args[0])
    u64, d64, v64 = m64.forward_jvp(*args, dz)
    u32, d32, v32 = m32.forward_jvp(*(a.float() if a.is_floating_point() else a for a in args), dz.float())
    assert rel_err(u32, u64) <= 1e-5 and rel_err(d32, d64) <= 1e-5 and rel_err(v32, v64) <= 1e-5


# =================================================================================================
#                                    Heads and gradients
# =================================================================================================
def test_heads_are_the_parts_of_both():
    model = _model("tiny", depth=4, head_depth=2)
    args = _inputs(model, 3, F64)
    u, v = model(*args)
    assert torch.equal(model(*args, heads="u"), u) and torch.equal(model(*args, heads="v"), v)
    assert rel_err(u, v) > 1e-3  # two different heads


def _count_block_calls(model):
    calls = {"trunk": 0, "u": 0, "v": 0}
    for name, blocks in (("trunk", model.trunk), ("u", model.u_blocks), ("v", model.v_blocks)):
        for b in blocks:
            b.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    return calls


@pytest.mark.parametrize("heads,expect", [("both", (2, 2, 2)), ("u", (2, 2, 0)), ("v", (2, 0, 2))])
def test_only_the_requested_heads_run(heads, expect):
    model = _model("tiny", depth=4, head_depth=2)
    calls = _count_block_calls(model)
    model(*_inputs(model, 2, F64), heads=heads)
    assert (calls["trunk"], calls["u"], calls["v"]) == expect


def test_forward_jvp_runs_the_v_head_once_on_the_primal():
    """forward_jvp runs the v-head's blocks once each (primal ``__call__``); the trunk and u-head run
    through ``forward_jvp`` (no primal ``__call__`` of theirs)."""
    model = _model("tiny", depth=4, head_depth=2)
    calls = _count_block_calls(model)
    args = _inputs(model, 2, F64)
    model.forward_jvp(*args, torch.randn_like(args[0]))
    assert (calls["trunk"], calls["u"], calls["v"]) == (0, 0, 2)


def test_backward_through_forward_jvp_matches_forward():
    """Grads through u (and v) of forward_jvp equal those through forward; u̇ carries no graph."""
    model = _model("tiny")
    args = _inputs(model, 3, F64)
    z = args[0]
    wu, wv = torch.randn_like(z), torch.randn_like(z)
    u, u_dot, v = model.forward_jvp(*args, torch.randn_like(z))
    assert not u_dot.requires_grad and u_dot.grad_fn is None
    params = list(model.parameters())
    loss = lambda u_, v_: (u_ * wu).sum() + (u_ ** 2).sum() + (v_ * wv).sum()  # noqa: E731
    g_jvp = torch.autograd.grad(loss(u, v), params, allow_unused=True)
    u2, v2 = model(*args)
    g_fwd = torch.autograd.grad(loss(u2, v2), params, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), g_jvp, g_fwd):
        assert (a is None) == (b is None), name
        if a is not None:
            assert rel_err(a, b) <= 1e-12, name
    # the u part alone: v's head gets no gradient
    g_u = dict(zip([n for n, _ in model.named_parameters()],
                   torch.autograd.grad((model.forward_jvp(*args, torch.randn_like(z))[0] * wu).sum(), params,
                                       allow_unused=True)))
    assert g_u["v_blocks.0.mlp.w1.weight"] is None and g_u["u_blocks.0.mlp.w1.weight"] is not None


def test_u_only_model_matches_full_model_on_u():
    full = _model("tiny")
    u_only = IMFDiT(IMFConfig(**{**full.config.__dict__, "v_head": False})).double()
    missing = u_only.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("v_blocks")})
    assert not missing.missing_keys and not missing.unexpected_keys
    args = _inputs(full, 2, F64)
    assert torch.equal(u_only(*args, heads="u"), full(*args, heads="u"))
    assert len(u_only.v_blocks) == 0 and hasattr(u_only, "v_final")


def test_default_init_outputs_zero_and_follows_the_official_scales():
    model = imf_dit("tiny")
    args = _inputs(model, 2, torch.float32)
    u, u_dot, v = model.forward_jvp(*args, torch.randn_like(args[0]))
    assert u.abs().max() == 0 and u_dot.abs().max() == 0 and v.abs().max() == 0
    assert all((b.attn_gate == 0).all() and (b.mlp_gate == 0).all() for b in (*model.trunk, *model.u_blocks))
    big = imf_dit("tiny", hidden_size=512, num_heads=8, depth=1, head_depth=0)
    std = lambda w: w.detach().double().std().item()  # noqa: E731
    assert std(big.trunk[0].attn.q_proj.weight) == pytest.approx(0.32 / 512 ** 0.5, rel=0.02)
    assert std(big.trunk[0].mlp.w2.weight) == pytest.approx(0.32 / int(512 * 8 / 3) ** 0.5, rel=0.02)
    assert std(big.h_embedder.mlp[2].weight) == pytest.approx(1 / 512 ** 0.5, rel=0.02)
    assert std(big.y_embedder.embedding_table.weight) == pytest.approx(1 / 512 ** 0.5, rel=0.1)
    assert std(big.class_tokens) == pytest.approx(1 / 512 ** 0.5, rel=0.2)


def test_scalars_broadcast():
    model = _model("tiny")
    z, _, _, _, _, _, y = _inputs(model, 2, F64)
    a = model(z, 1.0, 0.5, 3.0, 0.2, 0.8, y)
    b = model(z, *(torch.full((2,), s, dtype=F64) for s in (1.0, 0.5, 3.0, 0.2, 0.8)), y)
    c = model(z, *(torch.tensor(s, dtype=F64) for s in (1.0, 0.5, 3.0, 0.2, 0.8)), y)
    for x, x2, x3 in zip(a, b, c):
        assert torch.equal(x, x2) and torch.equal(x, x3)


# =================================================================================================
#                                   Bad configs (bad calls: test_model_inputs.py)
# =================================================================================================
def test_bad_presets_configs_and_backends():
    with pytest.raises(ValueError, match="preset must be one of"):
        imf_dit("H/2")
    with pytest.raises(ValueError, match="unknown IMFConfig field"):
        imf_dit("tiny", widht=3)
    with pytest.raises(ValueError, match="must be divisible by patch_size"):
        imf_dit("tiny", input_size=9)
    with pytest.raises(ValueError, match="heads of an even size"):
        imf_dit("tiny", hidden_size=66, num_heads=6)
    with pytest.raises(ValueError, match="head_depth must be in"):
        imf_dit("tiny", head_depth=4)
    with pytest.raises(ValueError, match="num_time_tokens must be ≥ 1"):
        imf_dit("tiny", num_time_tokens=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        IMFDiT(imf_dit("tiny").config, backend="cuda")
    # backend="triton" needs a head dim of the attention kernels (32, 64, 72, 96, 128): here 16
    with pytest.raises(ValueError, match=r"backend='triton' needs a head dim .*got 16"):
        IMFDiT(imf_dit("tiny", num_heads=4).config, backend="triton")
    model = _model("tiny", num_heads=4)
    model.backend = "triton"
    with pytest.raises(ValueError, match=r"backend='triton' needs a head dim .*got 16"):
        model(*_inputs(model, 1, F64))
    model.backend = "cuda"
    with pytest.raises(ValueError, match="backend must be one of"):
        model(*_inputs(model, 1, F64))
    assert IMFDiT(imf_dit("tiny").config, backend="triton").backend == "triton"  # head dim 32
    assert set(IMF_PRESETS) == {"B/2", "M/2", "L/2", "XL/2", "tiny", "digits"}
