"""IMFLoss against a line-by-line torch transcription of the official JAX objective (``iMeanFlow.forward``,
imf.py of the official repository's main branch), for a user's own (u, v) module and for the project's
IMFDiT; the draws' laws; the finite-difference option within its stated bound; bad input."""
import copy
import math
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import meanflow_fast.imf.loss as imf_loss
from meanflow_fast.imf.loss import IMFLoss
from meanflow_fast.imf.model import imf_dit
from meanflow_fast.jvp import default_step
from tests.helpers import fd_error_bound, randomize_, rel_err, spy_central_difference

NUM_CLASSES = 5


# =================================================================================================
#                  The official objective, transcribed to torch (fp64, every draw an input)
# =================================================================================================
class OfficialIMF:
    """iMeanFlow's training step, structure and names as in the official JAX code; each random draw is an
    argument (``make_rng("gen")`` → the raw normal or uniform variates), jax.jvp → torch.func.jvp,
    stop_gradient → detach. Images are NCHW here (the sums over axes (1, 2, 3) are the same)."""

    def __init__(self, net, num_classes, P_mean=-0.4, P_std=1.0, data_proportion=0.5, class_dropout_prob=0.1,
                 norm_p=1.0, norm_eps=0.01):
        self.net, self.num_classes = net, num_classes
        self.P_mean, self.P_std, self.data_proportion = P_mean, P_std, data_proportion
        self.class_dropout_prob, self.norm_p, self.norm_eps = class_dropout_prob, norm_p, norm_eps

    # Schedule ----------------------------------------------------------------------------------
    def logit_normal_dist(self, rnd_normal):
        return torch.sigmoid(rnd_normal * self.P_std + self.P_mean)

    def sample_tr(self, bz, rnd_t, rnd_r):
        t = self.logit_normal_dist(rnd_t.reshape(bz, 1, 1, 1))
        r = self.logit_normal_dist(rnd_r.reshape(bz, 1, 1, 1))
        t, r = torch.maximum(t, r), torch.minimum(t, r)
        data_size = int(bz * self.data_proportion)
        fm_mask = torch.arange(bz) < data_size
        fm_mask = fm_mask.reshape(bz, 1, 1, 1)
        r = torch.where(fm_mask, t, r)
        return t, r, fm_mask

    def sample_cfg_scale(self, u, s_max=7.0):  # cfg_beta = 1.0 (every official config)
        return torch.exp(u.reshape(-1, 1, 1, 1) * math.log1p(s_max))

    def sample_cfg_interval(self, u_start, u_end, fm_mask):
        t_min = 0.0 + 0.5 * u_start.reshape(-1, 1, 1, 1)   # uniform(minval=0.0, maxval=0.5)
        t_max = 0.5 + 0.5 * u_end.reshape(-1, 1, 1, 1)     # uniform(minval=0.5, maxval=1.0)
        t_min = torch.where(fm_mask, 0.0, t_min)
        t_max = torch.where(fm_mask, 1.0, t_max)
        return t_min, t_max

    # Training utils & guidance ---------------------------------------------------------------------
    def u_fn(self, x, t, h, omega, t_min, t_max, y):
        bz = x.shape[0]
        return self.net(x, t.reshape(bz), h.reshape(bz), omega.reshape(bz), t_min.reshape(bz),
                        t_max.reshape(bz), y)

    def v_cond_fn(self, x, t, omega, y):
        h = torch.zeros_like(t)
        t_min = torch.zeros_like(t)
        t_max = torch.ones_like(t)
        v = self.u_fn(x, t, h, omega, t_min, t_max, y=y)[1]
        return v

    def v_fn(self, x, t, omega, y):
        bz = x.shape[0]
        x = torch.cat([x, x], dim=0)
        y_null = torch.tensor([self.num_classes] * bz)
        y = torch.cat([y, y_null], dim=0)
        t = torch.cat([t, t], dim=0)
        w = torch.cat([omega, torch.ones_like(omega)], dim=0)
        out = self.v_cond_fn(x, t, w, y)
        v_c, v_u = torch.split(out, bz, dim=0)
        return v_c, v_u

    def cond_drop(self, v_t, v_g, labels, u_drop):
        bz = v_t.shape[0]
        rand_mask = u_drop < self.class_dropout_prob
        num_drop = torch.sum(rand_mask).to(torch.int32)
        drop_mask = torch.arange(bz)[:, None, None, None] < num_drop
        labels = torch.where(drop_mask.reshape(bz), self.num_classes, labels)
        v_g = torch.where(drop_mask, v_t, v_g)
        return labels, v_g

    def guidance_fn(self, v_t, z_t, t, r, y, fm_mask, w, t_min, t_max):
        v_c, v_u = self.v_fn(z_t, t, w, y=y)
        v_g_fm = v_t + (1 - 1 / w) * (v_c - v_u)
        w = torch.where((t >= t_min) & (t <= t_max), w, 1.0)
        v_c = self.v_cond_fn(z_t, t, w, y=y)
        v_g = v_t + (1 - 1 / w) * (v_c - v_u)
        v_g = torch.where(fm_mask, v_g_fm, v_g)
        return v_g, v_c

    # Forward pass and loss -------------------------------------------------------------------------
    def forward(self, images, labels, rnd_t, rnd_r, e, u_start, u_end, u_omega, u_drop):
        bz = images.shape[0]
        t, r, fm_mask = self.sample_tr(bz, rnd_t, rnd_r)
        t_min, t_max = self.sample_cfg_interval(u_start, u_end, fm_mask)
        omega = self.sample_cfg_scale(u_omega)
        return self.forward_from_draws(images, labels, t, r, fm_mask, e, t_min, t_max, omega, u_drop)

    def forward_from_draws(self, images, labels, t, r, fm_mask, e, t_min, t_max, omega, u_drop):
        x = images
        z_t = (1 - t) * x + t * e
        v_t = e - x
        with torch.no_grad():  # the guidance target is stop-gradient'ed below; no grad needed here
            v_g, v_c = self.guidance_fn(v_t, z_t, t, r, labels, fm_mask, omega, t_min, t_max)
        labels, v_g = self.cond_drop(v_t, v_g, labels, u_drop)

        def u_fn(z_t, t, r):
            return self.u_fn(z_t, t, t - r, omega, t_min, t_max, y=labels)

        dtdt = torch.ones_like(t)
        dtdr = torch.zeros_like(t)
        with sdpa_kernel([SDPBackend.MATH]):
            u, du_dt, v = torch.func.jvp(u_fn, (z_t, t, r), (v_c, dtdt, dtdr), has_aux=True)
        V = u + (t - r) * du_dt.detach()
        v_g = v_g.detach()

        def adp_wt_fn(loss):
            adp_wt = (loss + self.norm_eps) ** self.norm_p
            return loss / adp_wt.detach()

        loss_u = torch.sum((V - v_g) ** 2, dim=(1, 2, 3))
        rows_u = loss_u.detach()
        loss_u = adp_wt_fn(loss_u)
        loss_v = torch.sum((v - v_g) ** 2, dim=(1, 2, 3))
        loss_v = adp_wt_fn(loss_v)
        loss = loss_u + loss_v
        loss = loss.mean()
        dict_losses = {"loss": loss, "loss_u": torch.mean((V - v_g) ** 2), "loss_v": torch.mean((v - v_g) ** 2),
                       "rows_u": rows_u}  # rows_u: this test's addition (the per-row Σ(V − v_g)², for bounds)
        return loss, dict_losses


# =================================================================================================
#                                   Nets and draws for the tests
# =================================================================================================
class ToyIMF(nn.Module):
    """A user's own (u, v) module with the official signature, nonlinear in every input (t included,
    which the official net ignores: the JVP's tangent through t must still be there)."""

    def __init__(self, channels=2, size=4, num_classes=NUM_CLASSES, width=6):
        super().__init__()
        n = channels * size * size
        self.num_classes, self.scale = num_classes, 1 / math.sqrt(n)
        self.emb = nn.Embedding(num_classes + 1, width)
        self.cond = nn.Linear(5, width)
        self.inp = nn.Linear(n, width)
        self.out_u = nn.Linear(width, n)
        self.out_v = nn.Linear(width, n)

    def forward(self, z, t, h, omega, t_min, t_max, y):
        s = torch.stack([t, h, 1 - 1 / omega, t_min, t_max], dim=-1).to(z.dtype)
        c = torch.tanh(self.cond(s)) + self.emb(y)
        a = torch.sin(self.inp(z.flatten(1) * self.scale) + c) * (1 + 0.5 * torch.tanh(c))
        b = (t * h).to(z.dtype).view(-1, 1, 1, 1)
        u = self.out_u(a).view_as(z) + torch.sin(z) * b
        v = self.out_v(torch.tanh(a) + a * a).view_as(z)
        return u, v


def _toy(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return randomize_(ToyIMF(), std=0.5).to(dtype)


def _imf_model():
    """The digits preset with every parameter random (gates included): zero gates would hide the blocks."""
    return randomize_(imf_dit("digits"), std=0.15).double()


def _raw_draws(B, shape, data_proportion, n_drop, seed=0):
    """Raw variates for the official forward, chosen for mixed rows: flow-matching rows first; among the
    others, t below, inside and above [t_min, t_max]; the first n_drop rows dropped (the count rule)."""
    g = torch.Generator().manual_seed(seed)
    n_fm = int(B * data_proportion)
    rnd_t = torch.randn(B, generator=g, dtype=torch.float64)
    rnd_r = torch.randn(B, generator=g, dtype=torch.float64)
    # t = σ(−0.4 + n): rows after the fm ones cycle through t ≈ 0.15, 0.45, 0.8, 0.6
    cycle = torch.tensor([-1.3, 0.2, 1.8, 0.8], dtype=torch.float64)
    rest = torch.arange(B - n_fm)
    rnd_t[n_fm:] = cycle[rest % 4] + 0.05 * torch.rand(B - n_fm, generator=g, dtype=torch.float64)
    rnd_r[n_fm:] = rnd_t[n_fm:] - 0.5 - torch.rand(B - n_fm, generator=g, dtype=torch.float64)
    e = torch.randn((B,) + shape, generator=g, dtype=torch.float64)
    u_start = torch.full((B,), 0.6, dtype=torch.float64)   # t_min = 0.3
    u_end = torch.full((B,), 0.3, dtype=torch.float64)     # t_max = 0.65
    u_omega = torch.rand(B, generator=g, dtype=torch.float64)
    u_drop = torch.ones(B, dtype=torch.float64)
    u_drop[torch.randperm(B, generator=g)[:n_drop]] = 0.05  # n_drop draws below 0.1, anywhere
    return dict(rnd_t=rnd_t, rnd_r=rnd_r, e=e, u_start=u_start, u_end=u_end, u_omega=u_omega, u_drop=u_drop)


def _explicit(off, B, raw):
    """IMFLoss's keyword draws from the same raw variates, through the transcription's samplers."""
    t, r, fm = off.sample_tr(B, raw["rnd_t"], raw["rnd_r"])
    t_min, t_max = off.sample_cfg_interval(raw["u_start"], raw["u_end"], fm)
    omega = off.sample_cfg_scale(raw["u_omega"])
    n_drop = int((raw["u_drop"] < off.class_dropout_prob).sum())
    drop = torch.arange(B) < n_drop
    return dict(t=t.flatten(), r=r.flatten(), noise=raw["e"], omega=omega.flatten(), t_min=t_min.flatten(),
                t_max=t_max.flatten(), drop=drop)


def _grads(net):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]


def _assert_same_grads(g1, g2, tol):
    flat1, flat2 = torch.cat([g.flatten() for g in g1]), torch.cat([g.flatten() for g in g2])
    assert rel_err(flat1, flat2) <= tol
    scale = flat2.abs().max()
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=tol, atol=tol * scale)


def _run(loss_fn, net, x, y, **kw):
    net.zero_grad()
    loss, stats = loss_fn(net, x, y, **kw)
    loss.backward()
    return loss.detach(), stats, _grads(net)


# =================================================================================================
#                               IMFLoss = the official objective
# =================================================================================================
@pytest.mark.parametrize("data_proportion,n_drop", [(0.5, 2), (0.25, 3)])
def test_toy_net_equals_official_transcription(data_proportion, n_drop):
    """A user's module: loss, loss_u, loss_v and every gradient equal the transcription's (fp64)."""
    B, shape = 9, (2, 4, 4)
    net = _toy()
    x = torch.randn((B,) + shape, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (B,))
    raw = _raw_draws(B, shape, data_proportion, n_drop, seed=int(data_proportion * 100))
    off = OfficialIMF(net, NUM_CLASSES, data_proportion=data_proportion)
    net.zero_grad()
    ref, ref_stats = off.forward(x, y, **raw)
    ref.backward()
    ref_grads = _grads(net)
    kw = _explicit(off, B, raw)
    # the case covers every kind of row
    fm = kw["r"] == kw["t"]
    inside = (kw["t"] >= kw["t_min"]) & (kw["t"] <= kw["t_max"])
    assert fm.sum() == int(B * data_proportion) and bool((~fm & inside).any()) and bool((~fm & ~inside).any())
    assert kw["drop"].sum() == n_drop and bool((kw["drop"] & ~fm).any()) == (n_drop > int(B * data_proportion))

    loss, stats, grads = _run(IMFLoss(), net, x, y, **kw)  # "auto": torch.func.jvp for a user's module
    assert rel_err(loss, ref) <= 1e-10
    assert rel_err(stats["loss"], ref) <= 1e-10
    assert rel_err(stats["loss_u"], ref_stats["loss_u"]) <= 1e-10
    assert rel_err(stats["loss_v"], ref_stats["loss_v"]) <= 1e-10
    _assert_same_grads(grads, ref_grads, 1e-10)
    assert stats["frac_r_neq_t"].item() == pytest.approx(1 - int(B * data_proportion) / B)
    guided = ~kw["drop"] & (fm | inside)
    assert stats["frac_guided"].item() == pytest.approx(guided.double().mean().item())


def test_flow_matching_rows_with_an_interval_that_misses_t():
    """Rows with r = t use ω unclipped in their target (v_g_fm) but the clipped ω' = 1 in the tangent when
    t lies outside a given [t_min, t_max]: the transcription's guidance_fn, with draws the official sampler
    never makes, against IMFLoss."""
    B, shape = 6, (2, 4, 4)
    net = _toy(seed=1)
    x = torch.randn((B,) + shape, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (B,))
    t = torch.tensor([0.9, 0.2, 0.5, 0.7, 0.35, 0.95], dtype=torch.float64)
    r = torch.tensor([0.9, 0.2, 0.5, 0.1, 0.05, 0.3], dtype=torch.float64)
    t_min = torch.tensor([0.3, 0.3, 0.0, 0.3, 0.4, 0.1], dtype=torch.float64)
    t_max = torch.tensor([0.6, 0.6, 1.0, 0.6, 0.9, 0.6], dtype=torch.float64)
    omega = torch.tensor([3.0, 5.0, 2.0, 7.5, 1.5, 4.0], dtype=torch.float64)
    noise = torch.randn_like(x)
    u_drop = torch.tensor([0.05, 0.5, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    off = OfficialIMF(net, NUM_CLASSES)
    net.zero_grad()
    b = (B, 1, 1, 1)
    ref, ref_stats = off.forward_from_draws(x, y, t.view(b), r.view(b), (r == t).view(b), noise, t_min.view(b),
                                            t_max.view(b), omega.view(b), u_drop)
    ref.backward()
    ref_grads = _grads(net)
    loss, stats, grads = _run(IMFLoss(), net, x, y, t=t, r=r, noise=noise, omega=omega, t_min=t_min, t_max=t_max,
                              drop=torch.arange(B) < 1)
    assert rel_err(loss, ref) <= 1e-10 and rel_err(stats["loss_u"], ref_stats["loss_u"]) <= 1e-10
    _assert_same_grads(grads, ref_grads, 1e-10)


class _ToyWithForwardJvp(ToyIMF):
    """A user's module with its own forward_jvp (here through torch.func, with a marker of its use)."""
    used = 0

    def forward_jvp(self, z, t, h, omega, t_min, t_max, y, dz, dt=1.0, dh=1.0):
        type(self).used += 1
        u, u_dot, v = torch.func.jvp(lambda z_, t_, h_: self(z_, t_, h_, omega, t_min, t_max, y), (z, t, h),
                                     (dz, torch.full_like(t, dt), torch.full_like(h, dh)), has_aux=True)
        return u, u_dot.detach(), v


def test_user_forward_jvp_is_used_when_asked():
    """jvp="forward_jvp" calls a user's forward_jvp(z, t, h, ω, t_min, t_max, y, dz, dt=1, dh=1) and gives
    the torch.func path's loss and gradients; "auto" leaves a non-IMFDiT module on torch.func."""
    B = 6
    torch.manual_seed(2)
    net = randomize_(_ToyWithForwardJvp(), std=0.5).double()
    x = torch.randn(B, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (B,))
    results = []
    for mode in ("forward_jvp", "func", "auto"):
        before = _ToyWithForwardJvp.used
        results.append(_run(IMFLoss(jvp=mode), net, x, y, generator=torch.Generator().manual_seed(1)))
        assert _ToyWithForwardJvp.used - before == (mode == "forward_jvp")
    (l1, _, g1), (l2, _, g2), (l3, _, _) = results
    assert rel_err(l1, l2) <= 1e-12 and torch.equal(l2, l3)
    _assert_same_grads(g1, g2, 1e-10)


class _HeadsSpy:
    """Records every forward call of an IMFDiT instance: rows and the ``heads`` asked for."""

    def __init__(self, model):
        self.calls, self.orig = [], model.forward
        model.forward = self

    def __call__(self, z, *args, heads="both"):
        self.calls.append((z.shape[0], heads, torch.is_grad_enabled()))
        return self.orig(z, *args, heads=heads)


@pytest.mark.parametrize("jvp", ["auto", "func"])
def test_imf_dit_equals_official_transcription(jvp):
    """The project's IMFDiT (digits preset, random gates): the forward_jvp path (guidance through the
    trunk and v-head only) and the torch.func path both equal the transcription, loss and gradients."""
    B, shape = 8, (1, 8, 8)
    model = _imf_model()
    x = torch.randn((B,) + shape, dtype=torch.float64)
    y = torch.randint(0, 10, (B,))
    raw = _raw_draws(B, shape, 0.25, 3, seed=7)
    off = OfficialIMF(model, 10, data_proportion=0.25)
    model.zero_grad()
    ref, ref_stats = off.forward(x, y, **raw)
    ref.backward()
    ref_grads = _grads(model)
    spy = _HeadsSpy(model)
    loss, stats, grads = _run(IMFLoss(jvp=jvp), model, x, y, **_explicit(off, B, raw))
    assert rel_err(loss, ref) <= 1e-10
    assert rel_err(stats["loss_u"], ref_stats["loss_u"]) <= 1e-10
    assert rel_err(stats["loss_v"], ref_stats["loss_v"]) <= 1e-10
    _assert_same_grads(grads, ref_grads, 1e-10)
    # one guidance call of 3B rows on the v-head without grad; then the JVP's call (auto: forward_jvp,
    # which does not go through forward)
    assert spy.calls[0] == (3 * B, "v", False)
    assert spy.calls[1:] == ([] if jvp == "auto" else [(B, "both", True)])


def test_imf_dit_fd_path_calls_the_u_head_only_for_the_difference():
    B = 4
    model = _imf_model()
    spy = _HeadsSpy(model)
    x = torch.randn(B, 1, 8, 8, dtype=torch.float64)
    IMFLoss(jvp="fd")(model, x, torch.randint(0, 10, (B,)), generator=torch.Generator().manual_seed(0))
    assert spy.calls == [(3 * B, "v", False), (B, "both", True), (2 * B, "u", False)]


# =================================================================================================
#                                     The draws and their laws
# =================================================================================================
class _Recorder(nn.Module):
    """A cheap (u, v) net that records the inputs of its call with grad (the primal call of jvp="fd")."""

    def __init__(self):
        super().__init__()
        self.num_classes = NUM_CLASSES
        self.a = nn.Parameter(torch.tensor(0.5))
        self.seen = None

    def forward(self, z, t, h, omega, t_min, t_max, y):
        if torch.is_grad_enabled():
            self.seen = dict(t=t.detach().clone(), h=h.detach().clone(), omega=omega.detach().clone(),
                             t_min=t_min.detach().clone(), t_max=t_max.detach().clone(), y=y.clone())
        u = self.a * z * (1 + h.view(-1, 1, 1, 1))
        return u, self.a * z


def _drawn(B, seed, **settings):
    net = _Recorder()
    x = torch.randn(B, 1, 2, 2)
    y = torch.randint(0, NUM_CLASSES, (B,))
    _, stats = IMFLoss(jvp="fd", **settings)(net, x, y, generator=torch.Generator().manual_seed(seed))
    return net.seen, stats


def test_draws_follow_the_official_laws():
    B = 20_000
    d, stats = _drawn(B, 0)
    t, h, omega, t_min, t_max = d["t"], d["h"], d["omega"], d["t_min"], d["t_max"]
    r = t - h
    n_fm = B // 2
    fm = torch.arange(B) < n_fm
    assert bool((h[:n_fm] == 0).all()) and bool((h[n_fm:] > 0).all()) and bool((r >= 0).all())
    assert stats["frac_r_neq_t"].item() == 0.5
    # (t, r) on the other rows: the two logit-normal draws; pooled logits ~ N(−0.4, 1)
    logits = torch.logit(torch.cat([t[n_fm:], r[n_fm:]]).double())
    n = logits.numel()
    assert abs(logits.mean().item() + 0.4) < 4 / math.sqrt(n)
    assert abs(logits.std().item() - 1.0) < 4 / math.sqrt(2 * n)
    # on the flow-matching rows t is the larger of the two draws: E[logit t] = μ + σ/√π
    lt = torch.logit(t[:n_fm].double())
    assert abs(lt.mean().item() - (-0.4 + 1 / math.sqrt(math.pi))) < 4 / math.sqrt(n_fm)
    # ω = 8^U: log ω / log 8 uniform on [0, 1] (mean 1/2, sd 1/√12; a quarter below 1/4)
    s = (omega.double().log() / math.log(8.0))
    assert bool((omega >= 1).all()) and bool((omega <= 8).all())
    assert abs(s.mean().item() - 0.5) < 4 / math.sqrt(12 * B)
    assert abs((s < 0.25).double().mean().item() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / B)
    # the interval: [0, 1] on flow-matching rows, U(0, 0.5) and U(0.5, 1) elsewhere
    assert bool((t_min[fm] == 0).all()) and bool((t_max[fm] == 1).all())
    lo, hi = t_min[~fm].double(), t_max[~fm].double()
    assert bool((lo >= 0).all() & (lo <= 0.5).all() & (hi >= 0.5).all() & (hi <= 1).all())
    m = lo.numel()
    assert abs(lo.mean().item() - 0.25) < 4 * 0.5 / math.sqrt(12 * m)
    assert abs(hi.mean().item() - 0.75) < 4 * 0.5 / math.sqrt(12 * m)


def test_class_dropout_count_rule():
    """The first n rows take the null label, n ~ Binomial(B, 0.1)."""
    B, K = 50, 80
    counts = []
    for seed in range(K):
        d, _ = _drawn(B, seed)
        null = d["y"] == NUM_CLASSES
        n = int(null.sum())
        assert bool(null[:n].all()) and not bool(null[n:].any())
        counts.append(n)
    mean = sum(counts) / K
    assert abs(mean - 0.1 * B) < 4 * math.sqrt(B * 0.1 * 0.9 / K)


def test_flow_matching_row_count_follows_the_official_rule():
    """int(B · data_proportion) leading rows get r = t, data_proportion = 1 − ratio_r_neq_t (exact decimals)."""
    for ratio, proportion in (("0.5", "0.5"), ("0.25", "0.75"), ("0.7", "0.3"), ("0.9", "0.1"), ("0", "1"), ("1", "0")):
        for B in (1, 2, 3, 7, 10, 33):
            d, _ = _drawn(B, B, ratio_r_neq_t=float(ratio))
            n_fm = math.floor(B * Fraction(proportion))
            assert bool((d["h"][:n_fm] == 0).all()) and bool((d["h"][n_fm:] > 0).all()), (ratio, B)


def test_generator_reproduces_a_step():
    net = _toy()
    x = torch.randn(7, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (7,))
    loss_fn = IMFLoss()
    a, sa = loss_fn(net, x, y, generator=torch.Generator().manual_seed(5))
    b, sb = loss_fn(net, x, y, generator=torch.Generator().manual_seed(5))
    c, _ = loss_fn(net, x, y, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and all(torch.equal(sa[k], sb[k]) for k in sa) and not torch.equal(a, c)


# =================================================================================================
#                               jvp="fd": within the stated bound
# =================================================================================================
def _fd_case(dtype, seed=3, shape=(2, 4, 4), num_classes=NUM_CLASSES):
    """Explicit draws in which every r ≠ t row has room for the central stencil (h ≥ ε, 1 − t ≥ ε) and
    every r = t row for the forward one (1 − t ≥ 2ε)."""
    B = 8
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([0.3, 0.9, 0.55, 0.7, 0.45, 0.8, 0.2, 0.95], dtype=torch.float64)
    r = t * torch.tensor([1.0, 1.0, 1.0, 0.3, 0.6, 0.1, 0.5, 0.0], dtype=torch.float64)
    kw = dict(t=t, r=r, omega=1 + 7 * torch.rand(B, generator=g, dtype=torch.float64),
              t_min=torch.full((B,), 0.25, dtype=torch.float64), t_max=torch.full((B,), 0.75, dtype=torch.float64),
              noise=torch.randn((B,) + shape, generator=g, dtype=torch.float64),
              drop=torch.tensor([True] + [False] * (B - 1)))
    x = torch.randn((B,) + shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, num_classes, (B,), generator=g)
    cast = lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
    return cast(x), y, {k: cast(v) for k, v in kw.items()}


def _fd_bound(net64, call, dtype):
    """The loss's du/dt against torch.func.jvp (fp64), and the bound meanflow_fast/jvp.py states per element
    (tests.helpers.fd_error_bound)."""
    z, t, r, omega, t_min, t_max, y = call["primals"]
    dz = call["tangents"][0]
    eps = call["eps"] if call["eps"] is not None else default_step(dtype)
    net32 = copy.deepcopy(net64).float()

    def u_along(s, precision):
        c = lambda a: a.to(precision)  # noqa: E731
        ts = c(t) + c(s)
        return (net64 if precision == torch.float64 else net32)(c(z) + c(s).view(-1, 1, 1, 1) * c(dz), ts, ts - c(r),
                                                                c(omega), c(t_min), c(t_max), y)[0]
    return fd_error_bound(u_along, t, r, eps, dtype)


@pytest.mark.parametrize("kind", ["toy", "imf_dit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fd_du_dt_within_the_stated_bound(dtype, kind, monkeypatch):
    """The du/dt that IMFLoss(jvp="fd") computes, against torch.func.jvp, element by element: for a user's
    module and for the IMFDiT."""
    net64 = _toy(seed=4) if kind == "toy" else _imf_model()
    net = copy.deepcopy(net64).to(dtype)
    x, y, kw = _fd_case(dtype) if kind == "toy" else _fd_case(dtype, shape=(1, 8, 8), num_classes=10)
    seen = spy_central_difference(monkeypatch, imf_loss)
    IMFLoss(jvp="fd")(net, x, y, **kw)
    (call,) = seen
    exact, bound = _fd_bound(net64, call, dtype)
    err = (call["out"].double() - exact).abs()
    assert bool((err <= 1.5 * bound).all()), (err / bound).max()
    # and is small enough to mean something: 2e-4 to 5e-4 of the largest derivative in fp32, 3e-10 to 1.3e-9
    # in fp64 (the IMFDiT's du/dt is small next to its u, and the rounding part scales with |u|)
    assert bound.max() <= (1e-3 if dtype == torch.float32 else 1e-8) * exact.abs().max()


@pytest.mark.parametrize("adaptive_p", [1.0, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fd_loss_and_gradients_match_func_within_the_derived_bound(dtype, adaptive_p, monkeypatch):
    """jvp="fd" against jvp="func": only du/dt differs, by Δ (≤ the stated bound, per element), so V by
    h·Δ. With e = V − v_g, L = ‖e‖², L' = (√L − h‖Δ‖)₊² the smallest L on the way and
    |ΔL| ≤ 2√L·h‖Δ‖ + h²‖Δ‖²: a row's term L/(L + c)^p (its value) moves by at most c/(L' + c)²·|ΔL| at
    p = 1 (the slope of L/(L + c)) and |ΔL| at p = 0; its cotangent on u, 2e/(L + c)^p / B, by at most
    2h‖Δ‖/(L' + c)^p / B (e ↦ e/(‖e‖² + c) is 1/(‖e‖² + c)-Lipschitz), so the gradient by at most
    σ_max(∂u/∂θ) times that; the v terms are the same in both paths."""
    net64 = _toy(seed=5)
    net = copy.deepcopy(net64).to(dtype)
    x, y, kw = _fd_case(dtype, seed=6)
    B, c = x.shape[0], 0.01
    seen = spy_central_difference(monkeypatch, imf_loss)
    loss_fd, _, g_fd = _run(IMFLoss(jvp="fd", adaptive_p=adaptive_p), net, x, y, **kw)
    loss_fn, _, g_fn = _run(IMFLoss(jvp="func", adaptive_p=adaptive_p), net, x, y, **kw)
    exact, bound = _fd_bound(net64, seen[0], dtype)
    delta = bound.flatten(1).norm(dim=1)                               # ‖Δ_i‖ bound per row
    h = (kw["t"] - kw["r"]).double()
    # L_i (the transcription's per-row sums) and the Jacobian of u, fp64, at the same draws
    b = (B, 1, 1, 1)
    k64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
    off = OfficialIMF(net64, NUM_CLASSES, norm_p=adaptive_p)
    _, st = off.forward_from_draws(x.double(), y, k64["t"].view(b), k64["r"].view(b), (k64["r"] == k64["t"]).view(b),
                                   k64["noise"], k64["t_min"].view(b), k64["t_max"].view(b), k64["omega"].view(b),
                                   torch.where(k64["drop"], 0.0, 1.0))
    L = st["rows_u"]
    L_lo = (L.sqrt() - h * delta).clamp_min(0) ** 2
    dL = 2 * L.sqrt() * h * delta + (h * delta) ** 2
    slope = c / (L_lo + c) ** 2 if adaptive_p == 1.0 else torch.ones_like(L)
    loss_bound = (slope * dL).sum() / B
    dg = (2 * h * delta / (L_lo + c) ** adaptive_p / B).norm()
    y_in = torch.where(kw["drop"], NUM_CLASSES, y)
    z = (1 - k64["t"].view(b)) * x.double() + k64["t"].view(b) * k64["noise"]

    def u_of(p):
        return torch.func.functional_call(net64, p, (z, k64["t"], k64["t"] - k64["r"], k64["omega"], k64["t_min"],
                                                     k64["t_max"], y_in))[0].flatten()
    J = torch.cat([j.flatten(1) for j in torch.func.jacrev(u_of)(dict(net64.named_parameters())).values()], dim=1)
    grad_bound = torch.linalg.matrix_norm(J, ord=2) * dg
    flat = lambda gs: torch.cat([g.double().flatten() for g in gs])  # noqa: E731
    # the rounding of the two paths themselves: negligible in fp64; in fp32 the func path's own error
    if dtype == torch.float64:
        loss_round, grad_round = 1e-12 * abs(loss_fn.item()), 1e-12 * flat(g_fn).norm()
    else:
        ref_loss, _, ref_g = _run(IMFLoss(jvp="func", adaptive_p=adaptive_p), net64, x.double(), y, **k64)
        loss_round = 4 * abs(loss_fn.item() - ref_loss.item()) + 1e-6 * abs(ref_loss.item())
        grad_round = 4 * (flat(g_fn) - flat(ref_g)).norm() + 1e-6 * flat(ref_g).norm()
    assert abs(loss_fd.item() - loss_fn.item()) <= loss_bound + loss_round
    assert (flat(g_fd) - flat(g_fn)).norm() <= grad_bound + grad_round
    # and the bound is far below the gradient itself
    assert grad_bound <= 1e-3 * flat(g_fn).norm()


def test_fd_keeps_every_evaluation_in_range(monkeypatch):
    """Rows at the ends (t = 1, t close to 1, r = t) keep t + s ≤ 1 and h + s ≥ 0 at every evaluation,
    so a net that checks its inputs accepts them (for IMFDiT's own checks:
    tests/imf/test_model_inputs.py); the r = t = 1 row has no room and no use for du/dt (h = 0)."""
    net = _Recorder()
    calls = []
    orig = net.forward

    def record(z, t, h, *rest):
        calls.append((t.detach().clone(), h.detach().clone()))
        return orig(z, t, h, *rest)
    net.forward = record
    B = 5
    t = torch.tensor([1.0, 1.0 - 1e-3, 0.999, 0.5, 1.0])
    r = torch.tensor([0.5, 0.2, 0.999, 0.5, 1.0])
    x = torch.randn(B, 1, 2, 2)
    loss, _ = IMFLoss(jvp="fd")(net, x, torch.zeros(B, dtype=torch.long), t=t, r=r)
    assert torch.isfinite(loss)
    for ts, hs in calls:
        assert bool((ts <= 1).all()) and bool((hs >= 0).all()) and bool((hs <= ts).all())


# =================================================================================================
#                                            Bad input
# =================================================================================================
@pytest.mark.parametrize("settings,match", [
    (dict(jvp="fast"), "jvp must be one of"),
    (dict(ratio_r_neq_t=1.5), "ratio_r_neq_t"),
    (dict(time_sigma=0.0), "time_sigma"),
    (dict(time_mu=float("nan")), "time_mu must be finite"),
    (dict(omega_max=0.5), "omega_max must be ≥ 1"),
    (dict(omega_max=float("inf")), "omega_max must be ≥ 1"),
    (dict(t_min_range=(0.4, 0.2)), "t_min_range must be a pair"),
    (dict(t_max_range=(0.5, 1.2)), "t_max_range must be a pair"),
    (dict(t_min_range=(0.0, 0.6)), "t_min_range's top must not exceed t_max_range's bottom"),
    (dict(class_dropout=1.0), "class_dropout"),
    (dict(adaptive_c=0.0), "adaptive_c"),
    (dict(fd_eps=0.0), "fd_eps must be None"),
    (dict(fd_eps=float("nan")), "fd_eps must be None"),
])
def test_rejects_bad_settings(settings, match):
    with pytest.raises(ValueError, match=match):
        IMFLoss(**settings)


_B = 4
_f64 = dict(dtype=torch.float64)


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=torch.randn(0, 2, 4, 4, **_f64), y=torch.zeros(0, dtype=torch.long)), "empty batch"),
    (dict(x=torch.zeros(_B, 2, 4, 4, dtype=torch.long)), "x must be floating point"),
    (dict(y=torch.zeros(_B)), "y must be an integer tensor"),
    (dict(y=torch.tensor([0, 1, 2, NUM_CLASSES])), r"labels in \[0, 5\)"),
    (dict(t=torch.full((_B,), 0.5, **_f64)), "pass t and r together"),
    (dict(t=torch.full((_B,), 0.5, **_f64), r=torch.full((_B,), 0.6, **_f64)), "r must be ≤ t"),
    (dict(t=torch.full((_B,), 1.5, **_f64), r=torch.full((_B,), 0.6, **_f64)), r"t must lie in \[0, 1\]"),
    (dict(t=torch.full((_B + 1,), 0.5, **_f64), r=torch.full((_B + 1,), 0.1, **_f64)),
     r"t must be a float tensor of shape \(4,\)"),
    (dict(t_min=torch.zeros(_B, **_f64)), "pass t_min and t_max together"),
    (dict(t_min=torch.full((_B,), 0.6, **_f64), t_max=torch.full((_B,), 0.4, **_f64)), "0 ≤ t_min ≤ t_max ≤ 1"),
    (dict(t_min=torch.full((_B,), 0.2, **_f64), t_max=torch.full((_B,), 1.1, **_f64)), "0 ≤ t_min ≤ t_max ≤ 1"),
    (dict(t_min=torch.zeros(_B, dtype=torch.long), t_max=torch.ones(_B, dtype=torch.long)),
     "t_min must be a float tensor"),
    (dict(omega=torch.full((_B,), 0.5, **_f64)), "omega must be finite and ≥ 1"),
    (dict(omega=torch.full((_B,), float("nan"), **_f64)), "omega must be finite and ≥ 1"),
    (dict(omega=torch.full((_B, 1), 2.0, **_f64)), r"omega must be a float tensor of shape \(4,\)"),
    (dict(noise=torch.randn(_B, 2, 4, 5, **_f64)), "noise must have the shape of x"),
    (dict(noise=torch.randn(_B, 2, 4, 4)), "noise must have the dtype and device of x"),
    (dict(drop=torch.zeros(_B, dtype=torch.long)), "drop must be a bool tensor"),
    (dict(drop=torch.zeros(_B + 1, dtype=torch.bool)), "drop must be a bool tensor"),
])
def test_rejects_bad_input(kwargs, match):
    args = dict(x=torch.randn(_B, 2, 4, 4, **_f64), y=torch.randint(0, NUM_CLASSES, (_B,)))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        IMFLoss()(_toy(), args.pop("x"), args.pop("y"), **args)


def test_rejects_nets_that_do_not_fit():
    x = torch.randn(_B, 2, 4, 4, **_f64)
    y = torch.randint(0, NUM_CLASSES, (_B,))
    net = _toy()
    with pytest.raises(ValueError, match="num_classes is unknown"):
        IMFLoss()(lambda *a: net(*a), x, y)
    IMFLoss(num_classes=NUM_CLASSES)(lambda *a: net(*a), x, y)  # a plain callable with num_classes given
    with pytest.raises(ValueError, match=r"must return a pair \(u, v\)"):
        IMFLoss(num_classes=NUM_CLASSES)(lambda *a: net(*a)[0], x, y)
    with pytest.raises(ValueError, match="jvp='forward_jvp' needs a net with a forward_jvp"):
        IMFLoss(jvp="forward_jvp")(net, x, y)

    class SmallTable(ToyIMF):  # no row for the null label
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(NUM_CLASSES, 6)
    with pytest.raises(ValueError, match=rf"must accept the label {NUM_CLASSES} \(the null label") as info:
        IMFLoss()(SmallTable().double(), x, y, drop=torch.zeros(_B, dtype=torch.bool))
    assert isinstance(info.value.__cause__, IndexError)
