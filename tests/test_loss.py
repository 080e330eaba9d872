"""MeanFlowLoss against a hand-written computation, the (t, r) sampler's statistics, and the
equivalence of its two JVP paths."""
import copy
import math
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import meanflow_fast.loss as loss_mod
import meanflow_fast.model as model_mod
from meanflow_fast import MeanFlowLoss, meanflow_dit, sample_t_r
from meanflow_fast.jvp import default_step
from meanflow_fast.loss import check_settings
from tests.helpers import fd_error_bound, randomize_, rel_err, spy_central_difference

NUM_CLASSES = 5


def _model():
    m = meanflow_dit("tiny", input_size=4, in_channels=2, depth=2, hidden_size=32, num_heads=2,
                     num_classes=NUM_CLASSES, freq_dim=16)
    return randomize_(m, std=0.2).double()


def _draws(B=6):
    x = torch.randn(B, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (B,))
    t = torch.tensor([0.95, 0.8, 0.6, 0.4, 0.3, 0.1], dtype=torch.float64)[:B]
    r = t * torch.tensor([0.0, 1.0, 0.5, 1.0, 0.2, 0.7], dtype=torch.float64)[:B]
    noise = torch.randn_like(x)
    drop = torch.tensor([False, False, True, False, False, False])[:B]
    return x, y, t, r, noise, drop


def hand_loss(model, x, y, t, r, noise, drop, omega, kappa, interval, p, c, rows=False):
    """docs/DESIGN.md, "1 The MeanFlow objective", written out step by step, with torch.func.jvp for
    (u, du/dt). ``rows``: return the per-row sums L_i instead."""
    b = (-1, 1, 1, 1)
    z = (1 - t.view(b)) * x + t.view(b) * noise
    v = noise - x
    y_in = torch.where(drop, torch.full_like(y, NUM_CLASSES), y)
    with torch.no_grad():
        u_c = model(z, t, t, y)
        u_u = model(z, t, t, torch.full_like(y, NUM_CLASSES))
    v_g = omega * v + kappa * u_c + (1 - omega - kappa) * u_u
    use = (t >= interval[0]) & (t <= interval[1]) & ~drop
    v_t = torch.where(use.view(b), v_g, v)
    with sdpa_kernel([SDPBackend.MATH]):
        u, dudt = torch.func.jvp(lambda z_, r_, t_: model(z_, r_, t_, y_in), (z, r, t),
                                 (v_t, torch.zeros_like(r), torch.ones_like(t)))
    u_tgt = (v_t - (t - r).clamp(0, 1).view(b) * dudt).detach()
    L = ((u - u_tgt) ** 2).sum(dim=(1, 2, 3))
    if rows:
        return L.detach()
    w = 1 / (L.detach() + c) ** p
    return (w * L).mean(), L.mean()


@pytest.mark.parametrize("omega,kappa,interval", [(1.0, 0.0, (0.0, 1.0)), (0.6, 0.3, (0.0, 0.75)),
                                                  (2.0, 0.0, (0.2, 0.9))])
@pytest.mark.parametrize("jvp", ["forward_jvp", "func"])
def test_loss_equals_hand_written(omega, kappa, interval, jvp):
    model = _model()
    x, y, t, r, noise, drop = _draws()
    loss_fn = MeanFlowLoss(omega=omega, kappa=kappa, guidance_interval=interval, adaptive_p=0.75,
                           adaptive_c=0.05, jvp=jvp)
    loss, stats = loss_fn(model, x, y, t=t, r=r, noise=noise, drop=drop)
    ref, raw = hand_loss(model, x, y, t, r, noise, drop, omega, kappa, interval, 0.75, 0.05)
    assert rel_err(loss, ref) <= 1e-10
    assert rel_err(stats["raw_loss"], raw) <= 1e-10
    assert stats["frac_r_neq_t"].item() == pytest.approx(4 / 6)


def test_unguided_setting_equals_guided_formula_at_omega_1_kappa_0(monkeypatch):
    """ω = 1, κ = 0 skips the guidance calls; forcing the guided code path gives the same loss."""
    model = _model()
    x, y, t, r, noise, drop = _draws()
    loss_fn = MeanFlowLoss(omega=1.0, kappa=0.0)
    plain, _ = loss_fn(model, x, y, t=t, r=r, noise=noise, drop=drop)
    monkeypatch.setattr(MeanFlowLoss, "guided", property(lambda self: True))
    forced, _ = loss_fn(model, x, y, t=t, r=r, noise=noise, drop=drop)
    assert rel_err(forced, plain) <= 1e-12


def test_fallback_and_forward_jvp_give_same_loss_and_grads():
    model = _model()
    x, y, *_ = _draws()
    results = []
    for mode in ("forward_jvp", "func"):
        model.zero_grad()
        loss, _ = MeanFlowLoss(omega=0.5, kappa=0.3, jvp=mode)(model, x, y,
                                                               generator=torch.Generator().manual_seed(3))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l1, g1), (l2, g2) = results
    assert rel_err(l1, l2) <= 1e-10
    for a, b in zip(g1, g2):
        assert rel_err(a, b) <= 1e-9


def test_plain_callable_model_through_torch_func_jvp():
    """Any callable u(z, r, t, y) works (num_classes given explicitly)."""
    model = _model()
    x, y, t, r, noise, drop = _draws()
    fn = lambda z, r_, t_, y_: model(z, r_, t_, y_)  # noqa: E731  (no forward_jvp attribute)
    a, _ = MeanFlowLoss(num_classes=NUM_CLASSES)(fn, x, y, t=t, r=r, noise=noise, drop=drop)
    b, _ = MeanFlowLoss(num_classes=NUM_CLASSES)(model, x, y, t=t, r=r, noise=noise, drop=drop)
    assert rel_err(a, b) <= 1e-10
    with pytest.raises(ValueError, match="num_classes is unknown"):
        MeanFlowLoss()(fn, x, y)


def test_flow_matching_limit():
    """ratio_r_neq_t = 0 → r = t everywhere and the target is v: plain (weighted) flow matching."""
    model = _model()
    x, y, *_ = _draws()
    g = torch.Generator().manual_seed(11)
    loss, stats = MeanFlowLoss(ratio_r_neq_t=0.0, class_dropout=0.0, adaptive_p=0.0)(model, x, y, generator=g)
    g = torch.Generator().manual_seed(11)
    t, r = (s.double() for s in sample_t_r(6, ratio_r_neq_t=0.0, generator=g))
    noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
    assert torch.equal(t, r) and stats["frac_r_neq_t"].item() == 0
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
    ref = ((model(z, t, t, y) - (noise - x)) ** 2).sum(dim=(1, 2, 3)).mean()
    assert rel_err(loss, ref) <= 1e-10


def test_generator_reproduces_a_step():
    model = _model()
    x, y, *_ = _draws()
    loss_fn = MeanFlowLoss(omega=0.7, kappa=0.2)
    a, _ = loss_fn(model, x, y, generator=torch.Generator().manual_seed(5))
    b, _ = loss_fn(model, x, y, generator=torch.Generator().manual_seed(5))
    c, _ = loss_fn(model, x, y, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------- (t, r) sampler
def test_time_sampler_statistics():
    B, mu, sigma = 40_000, -0.4, 1.0
    t, r = sample_t_r(B, mu=mu, sigma=sigma, ratio_r_neq_t=0.25, generator=torch.Generator().manual_seed(0))
    assert t.shape == r.shape == (B,)
    assert bool((r <= t).all()) and bool((r > 0).all()) and bool((t < 1).all())
    neq = r != t
    assert neq.sum().item() == round(0.25 * B)
    # Where r ≠ t, {t, r} are the two independent logit-normal draws: pooled logits ~ N(mu, sigma²).
    logits = torch.logit(torch.cat([t[neq], r[neq]]).double())
    n = logits.numel()
    assert abs(logits.mean().item() - mu) < 4 * sigma / math.sqrt(n)
    assert abs(logits.std().item() - sigma) < 4 * sigma / math.sqrt(2 * n)
    # Where r = t, t is the max of two draws: E[max] = mu + sigma/√π (a closed form).
    lt = torch.logit(t[~neq].double())
    assert abs(lt.mean().item() - (mu + sigma / math.sqrt(math.pi))) < 4 * sigma / math.sqrt(lt.numel())


def _official_r_eq_t_rows(bz, data_proportion: str) -> int:
    """The official code's count of r = t rows, ``int(bz * data_proportion)`` (data_proportion = 1 − ratio),
    in exact decimal arithmetic: in floats it would give 62, not 63, at bz = 90, 0.7."""
    return math.floor(bz * Fraction(data_proportion))


def test_r_neq_t_count_follows_the_official_rule():
    """int(B·(1 − ratio)) rows get r = t: one r ≠ t row remains at B = 1 or 2 (not flow matching)."""
    hand_worked = [  # (batch, ratio, r ≠ t rows)
        (128, 0.25, 32), (100, 0.25, 25), (1, 0.25, 1), (2, 0.25, 1), (3, 0.25, 1), (5, 0.25, 2),
        (6, 0.25, 2), (10, 0.9, 9), (90, 0.3, 27), (7, 0.5, 4), (1, 0.0, 0), (2, 0.0, 0), (1, 1.0, 1),
        (2, 1.0, 2)]
    for batch, ratio, neq in hand_worked:
        t, r = sample_t_r(batch, ratio_r_neq_t=ratio, generator=torch.Generator().manual_seed(batch))
        official = batch - _official_r_eq_t_rows(batch, str(1 - Fraction(str(ratio))))
        assert (r != t).sum().item() == neq == official, (batch, ratio)
    for ratio, proportion in (("0.25", "0.75"), ("0.1", "0.9"), ("0.3", "0.7"), ("0.7", "0.3"), ("0.9", "0.1")):
        for batch in range(1, 200):
            t, r = sample_t_r(batch, ratio_r_neq_t=float(ratio), generator=torch.Generator().manual_seed(0))
            assert (r != t).sum().item() == batch - _official_r_eq_t_rows(batch, proportion), (ratio, batch)
    # B = 128 (the demo's batch), where the count is unchanged: the same draws as before, in the same order
    g = torch.Generator().manual_seed(4)
    t, r = sample_t_r(128, generator=torch.Generator().manual_seed(4))
    s = torch.sigmoid(-0.4 + torch.randn((2, 128), generator=g))
    t_ref, r_ref = s.max(dim=0).values, s.min(dim=0).values
    equal = torch.randperm(128, generator=g)[32:]
    r_ref[equal] = t_ref[equal]
    assert torch.equal(t, t_ref) and torch.equal(r, r_ref)


@pytest.mark.parametrize("batch,frac", [(1, 1.0), (2, 0.5)])
def test_small_batches_keep_an_r_neq_t_row(batch, frac):
    model = _model()
    x, y, *_ = _draws(batch)
    _, stats = MeanFlowLoss()(model, x, y, generator=torch.Generator().manual_seed(0))
    assert stats["frac_r_neq_t"].item() == frac


class _SmallTableModel(nn.Module):
    """A user's model whose label embedding has num_classes rows: no room for the null label."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(NUM_CLASSES, 1).double()

    def forward(self, z, r, t, y):
        return z * (1 + t[:, None, None, None] - r[:, None, None, None]) + self.emb(y)[:, :, None, None]


@pytest.mark.parametrize("settings,drop", [
    (dict(), [False, False, True, False, False, False]),          # class dropout in the JVP call
    (dict(ratio_r_neq_t=0.0), [True] * 6),                        # flow matching: the plain call
    (dict(omega=2.0), [False] * 6),                               # guidance: the unconditional call
])
def test_null_label_index_error_is_explained(settings, drop):
    x, y, t, r, noise, _ = _draws()
    loss_fn = MeanFlowLoss(num_classes=NUM_CLASSES, **settings)
    with pytest.raises(ValueError, match=rf"must accept the label {NUM_CLASSES} \(the null label") as info:
        loss_fn(_SmallTableModel(), x, y, noise=noise, drop=torch.tensor(drop))
    assert isinstance(info.value.__cause__, IndexError)
    # no null label in the batch, no guidance: the model works
    loss, _ = MeanFlowLoss(num_classes=NUM_CLASSES)(_SmallTableModel(), x, y, t=t, r=r, noise=noise,
                                                    drop=torch.zeros(6, dtype=torch.bool))
    assert torch.isfinite(loss)


def test_class_dropout_rate():
    model = _model()
    """About 10% of the labels reaching the network are the null label."""
    loss_fn = MeanFlowLoss(class_dropout=0.1)
    x, y, *_ = _draws()
    seen = []
    orig = model.forward_jvp

    def spy(z, r, t, y_in, dz):
        seen.append(y_in.clone())
        return orig(z, r, t, y_in, dz)
    model.forward_jvp = spy
    for s in range(60):
        loss_fn(model, x, y, generator=torch.Generator().manual_seed(s))
    frac = sum((s == NUM_CLASSES).sum().item() for s in seen) / (60 * 6)
    assert 0.04 < frac < 0.18


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(t=torch.tensor([0.5] * 6, dtype=torch.float64), r=torch.tensor([0.6] * 6, dtype=torch.float64)),
     "r must be ≤ t"),
    (dict(y=torch.tensor([0, 1, 2, 3, 4, 5])), r"labels in \[0, 5\)"),
    (dict(y=torch.tensor([0, 1, 2, 3, -1, 4])), r"labels in \[0, 5\)"),
    (dict(x=torch.randn(0, 2, 4, 4, dtype=torch.float64), y=torch.zeros(0, dtype=torch.long)), "empty batch"),
    (dict(t=torch.tensor([0.5] * 6, dtype=torch.float64)), "pass t and r together"),
    (dict(noise=torch.randn(6, 2, 4, 5)), "noise must have the shape of x"),
    (dict(y=torch.zeros(6)), "y must be an integer tensor"),
])
def test_loss_rejects_bad_input(kwargs, match):
    model = _model()
    x, y, *_ = _draws()
    args = dict(x=x, y=y)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MeanFlowLoss()(model, args.pop("x"), args.pop("y"), **args)


def test_loss_rejects_bad_config():
    with pytest.raises(ValueError, match="guidance_interval"):
        MeanFlowLoss(guidance_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="jvp must be"):
        MeanFlowLoss(jvp="fast")
    with pytest.raises(ValueError, match="ratio_r_neq_t"):
        MeanFlowLoss(ratio_r_neq_t=1.5)


def test_loss_rejects_meaningless_guidance():
    bad = [(-0.5, 0.0, "omega must be ≥ 0"), (float("nan"), 0.0, "omega must be ≥ 0"),
           (float("inf"), 0.0, "omega must be ≥ 0"), (1.0, 1.0, r"kappa must be in \[0, 1\)"),
           (0.2, 1.5, r"kappa must be in \[0, 1\)"), (1.0, -0.1, r"kappa must be in \[0, 1\)"),
           (1.0, float("nan"), r"kappa must be in \[0, 1\)")]
    for omega, kappa, match in bad:
        with pytest.raises(ValueError, match=match):
            MeanFlowLoss(omega=omega, kappa=kappa)
        with pytest.raises(ValueError, match="--" + match.split()[0]):  # meanflow-train's flag names
            check_settings(time_sigma=1.0, ratio_r_neq_t=0.25, guidance_interval=(0.0, 1.0), class_dropout=0.1,
                           adaptive_p=1.0, adaptive_c=0.01, omega=omega, kappa=kappa,
                           name=lambda setting: "--" + setting.replace("_", "-"))
    # accepted: unguided, the L/2 setting ω = 0.2, κ = 0.92 (effective scale ω/(1 − κ) = 2.5), scale 0
    for omega, kappa in [(1.0, 0.0), (0.2, 0.92), (3.0, 0.0), (1.0, 0.5), (0.0, 0.0)]:
        MeanFlowLoss(omega=omega, kappa=kappa)


# ------------------------------------------------------------------------------- explicit draws: dtype, device, NaN
@pytest.mark.parametrize("kwargs,match", [
    # noise of another dtype than x made z float32 for a float64 model: a raw conv RuntimeError before
    (dict(noise=torch.randn(6, 2, 4, 4)), r"noise must have the dtype and device of x \(torch.float64 on cpu\), "
                                          r"got torch.float32 on cpu: pass noise.to\(x\)"),
    (dict(noise=torch.randn(6, 2, 4, 4, dtype=torch.float64, device="meta")), "noise must have the dtype and device"),
    (dict(noise=torch.randn(6, 2, 16)), r"noise must have the shape of x \(6, 2, 4, 4\), got \(6, 2, 16\)"),
    # NaN passed the (t < 0) | (t > 1) test before
    (dict(t=torch.tensor([0.5, float("nan"), 0.5, 0.5, 0.5, 0.5], dtype=torch.float64),
          r=torch.zeros(6, dtype=torch.float64)), r"t must lie in \[0, 1\] .*got NaN"),
    (dict(t=torch.full((6,), 0.5, dtype=torch.float64), r=torch.tensor([0.1] * 5 + [1.5], dtype=torch.float64)),
     r"r must lie in \[0, 1\] \(0 ≤ r ≤ t ≤ 1\), got r.min\(\) = 0.1, r.max\(\) = 1.5"),
    (dict(t=torch.full((6,), 0.5, dtype=torch.float64), r=torch.tensor([0.1] * 4 + [0.6, 0.7], dtype=torch.float64)),
     r"r must be ≤ t for every sample .*r = 0.6 > t = 0.5 at sample 4 \(r > t at 2 of 6 samples\)"),
], ids=["noise dtype", "noise device", "noise shape", "t NaN", "r > 1", "r > t"])
def test_loss_checks_explicit_draws(kwargs, match):
    model = _model()
    x, y, *_ = _draws()
    with pytest.raises(ValueError, match=match):
        MeanFlowLoss()(model, x, y, **kwargs)


def test_loss_data_of_another_dtype_than_the_model_is_named():
    """float32 data into a float64 model: the model's own check names z and both dtypes (a raw conv
    RuntimeError before)."""
    model = _model()
    x, y, *_ = _draws()
    with pytest.raises(ValueError, match="z has dtype torch.float32 but the model's parameters are torch.float64"):
        MeanFlowLoss()(model, x.float(), y)


# ------------------------------------------------------------------------------- jvp="fd"
def _fd_bound(model64, call, dtype):
    """The loss's du/dt against torch.func.jvp (fp64) along the same direction (dz, dr, dt) = (ṽ, 0, 1), and
    the bound meanflow_fast/jvp.py states per element (tests.helpers.fd_error_bound)."""
    z, r, t, y = call["primals"]
    dz = call["tangents"][0]
    assert call["tangents"][1] is None and torch.equal(call["tangents"][2], torch.ones_like(t))
    eps = call["eps"] if call["eps"] is not None else default_step(dtype)
    model32 = copy.deepcopy(model64).float()

    def u_along(s, precision):
        c = lambda a: a.to(precision)  # noqa: E731
        s = c(s)
        return (model64 if precision == torch.float64 else model32)(c(z) + s.view(-1, 1, 1, 1) * c(dz), c(r),
                                                                    c(t) + s, y)
    return fd_error_bound(u_along, t, r, eps, dtype)


def _fd_draws(dtype, seed=0):
    x, y, t, r, noise, drop = _draws()
    g = torch.Generator().manual_seed(seed)
    x, noise = (torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(2))
    cast = lambda v: v.to(dtype)  # noqa: E731
    return cast(x), y, dict(t=cast(t), r=cast(r), noise=cast(noise), drop=drop)


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fd_du_dt_within_the_stated_bound(dtype, guided, monkeypatch):
    """The du/dt that MeanFlowLoss(jvp="fd") computes, against torch.func.jvp, element by element, on central
    rows (r < t) and forward rows (r = t), with and without guidance (which changes the direction ṽ)."""
    model64 = _model()
    model = copy.deepcopy(model64).to(dtype)
    x, y, kw = _fd_draws(dtype, seed=1)
    seen = spy_central_difference(monkeypatch, loss_mod)
    MeanFlowLoss(jvp="fd", **(dict(omega=0.6, kappa=0.3) if guided else {}))(model, x, y, **kw)
    (call,) = seen
    assert call["stacked"] and call["primals"][2].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    exact, bound = _fd_bound(model64, call, dtype)
    err = (call["out"].double() - exact).abs()
    assert bool((err <= 1.5 * bound).all()), (err / bound).max()
    # and small enough to mean something
    assert bound.max() <= (1e-3 if dtype == torch.float32 else 1e-8) * exact.abs().max()


@pytest.mark.parametrize("adaptive_p", [1.0, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fd_loss_and_gradients_match_func_within_the_derived_bound(dtype, adaptive_p, monkeypatch):
    """jvp="fd" against jvp="func": only du/dt differs, by Δ (≤ the stated bound, per element), so the target
    u_tgt = ṽ − h·du/dt by h·Δ (h = t − r). With e = u − u_tgt, L = ‖e‖², L' = (√L − h‖Δ‖)₊² the smallest L
    on the way and |ΔL| ≤ 2√L·h‖Δ‖ + h²‖Δ‖²: a row's term L/(L + c)^p moves by at most c/(L' + c)²·|ΔL| at
    p = 1 (the slope of L/(L + c)) and |ΔL| at p = 0; its cotangent on u, 2e/(L + c)^p / B, by at most
    2h‖Δ‖/(L' + c)^p / B (e ↦ e/(‖e‖² + c) is 1/(‖e‖² + c)-Lipschitz), so the gradient by at most
    σ_max(∂u/∂θ) times that."""
    model64 = _model()
    model = copy.deepcopy(model64).to(dtype)
    x, y, kw = _fd_draws(dtype, seed=2)
    B, c = x.shape[0], 0.01
    guidance = dict(omega=0.6, kappa=0.3, guidance_interval=(0.0, 0.9))

    def run(m, x_, mode, **k):
        m.zero_grad()
        loss, _ = MeanFlowLoss(jvp=mode, adaptive_p=adaptive_p, adaptive_c=c, **guidance)(m, x_, y, **k)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters()]

    seen = spy_central_difference(monkeypatch, loss_mod)
    loss_fd, g_fd = run(model, x, "fd", **kw)
    loss_fn, g_fn = run(model, x, "func", **kw)
    exact, bound = _fd_bound(model64, seen[0], dtype)
    delta = bound.flatten(1).norm(dim=1)                               # ‖Δ_i‖ bound per row
    k64 = {k: v.double() if v.is_floating_point() else v for k, v in kw.items()}
    h = (k64["t"] - k64["r"]).clamp(0, 1)
    L = hand_loss(model64, x.double(), y, k64["t"], k64["r"], k64["noise"], k64["drop"], 0.6, 0.3, (0.0, 0.9),
                  adaptive_p, c, rows=True)
    L_lo = (L.sqrt() - h * delta).clamp_min(0) ** 2
    dL = 2 * L.sqrt() * h * delta + (h * delta) ** 2
    slope = c / (L_lo + c) ** 2 if adaptive_p == 1.0 else torch.ones_like(L)
    loss_bound = (slope * dL).sum() / B
    dg = (2 * h * delta / (L_lo + c) ** adaptive_p / B).norm()
    b = (-1, 1, 1, 1)
    z = (1 - k64["t"].view(b)) * x.double() + k64["t"].view(b) * k64["noise"]
    y_in = torch.where(kw["drop"], NUM_CLASSES, y)

    def u_of(p):
        return torch.func.functional_call(model64, p, (z, k64["r"], k64["t"], y_in)).flatten()
    with sdpa_kernel([SDPBackend.MATH]):
        jac = torch.func.jacrev(u_of)(dict(model64.named_parameters()))
    J = torch.cat([j.flatten(1) for j in jac.values()], dim=1)
    grad_bound = torch.linalg.matrix_norm(J, ord=2) * dg
    flat = lambda gs: torch.cat([g.double().flatten() for g in gs])  # noqa: E731
    # the rounding of the two paths themselves: negligible in fp64; in fp32 the func path's own error
    if dtype == torch.float64:
        loss_round, grad_round = 1e-12 * abs(loss_fn.item()), 1e-12 * flat(g_fn).norm()
    else:
        ref_loss, ref_g = run(model64, x.double(), "func", **k64)
        loss_round = 4 * abs(loss_fn.item() - ref_loss.item()) + 1e-6 * abs(ref_loss.item())
        grad_round = 4 * (flat(g_fn) - flat(ref_g)).norm() + 1e-6 * flat(ref_g).norm()
    assert abs(loss_fd.item() - loss_fn.item()) <= loss_bound + loss_round
    assert (flat(g_fd) - flat(g_fn)).norm() <= grad_bound + grad_round
    # and the bound is far below the gradient itself
    assert grad_bound <= 1e-3 * flat(g_fn).norm()


def test_fd_keeps_every_evaluation_in_range(monkeypatch):
    """Rows at the ends (t = 1, t close to 1, r = t, r = t = 1) keep r ≤ t + s ≤ 1 at every evaluation: a
    plain callable records them, and a MeanFlowDiT with its own value checks forced on (the loss vouches
    for its points) accepts them."""
    model = _model().float()
    calls = []

    def recorder(z, r, t, y):
        calls.append((r.detach().clone(), t.detach().clone()))
        return model(z, r, t, y)
    B = 5
    t = torch.tensor([1.0, 1.0 - 1e-3, 0.999, 0.5, 1.0])
    r = torch.tensor([0.5, 0.2, 0.999, 0.5, 1.0])
    x, y = torch.randn(B, 2, 4, 4), torch.zeros(B, dtype=torch.long)
    loss, _ = MeanFlowLoss(num_classes=NUM_CLASSES, jvp="fd")(recorder, x, y, t=t, r=r)
    assert torch.isfinite(loss) and len(calls) == 2  # the primal call and one stacked call of 2B rows
    for rs, ts in calls:
        assert bool((rs >= 0).all() & (rs <= ts).all() & (ts <= 1).all())
    assert calls[1][1].shape == (2 * B,) and not torch.equal(calls[1][1][:B], t)  # t did move
    checked = []
    orig = model_mod.check_values
    monkeypatch.setattr(model_mod, "value_checks_on", lambda: True)
    monkeypatch.setattr(model_mod, "check_values", lambda *a, **k: checked.append(a) or orig(*a, **k))
    loss, _ = MeanFlowLoss(jvp="fd")(model, x, y, t=t, r=r)
    assert torch.isfinite(loss) and len(checked) == 2


def test_fd_settings_and_the_forward_jvp_mode_are_checked():
    with pytest.raises(ValueError, match=r"jvp must be one of \('auto', 'forward_jvp', 'func', 'fd'\), got 'fast'"):
        MeanFlowLoss(jvp="fast")
    for bad in (0.0, -1e-3, float("nan"), float("inf"), "0.01", True):
        with pytest.raises(ValueError, match=r"fd_eps must be None \(the dtype's default step\) or a finite float > 0"):
            MeanFlowLoss(jvp="fd", fd_eps=bad)
    with pytest.raises(ValueError, match="--fd-eps must be None"):
        check_settings(time_sigma=1.0, ratio_r_neq_t=0.25, guidance_interval=(0.0, 1.0), class_dropout=0.1,
                       adaptive_p=1.0, adaptive_c=0.01, fd_eps=0.0, name=lambda s: "--" + s.replace("_", "-"))
    model = _model()
    x, y, *_ = _draws()
    fn = lambda z, r_, t_, y_: model(z, r_, t_, y_)  # noqa: E731
    with pytest.raises(ValueError, match=r"jvp='forward_jvp' needs a model with a forward_jvp\(z, r, t, y, dz\)"):
        MeanFlowLoss(num_classes=NUM_CLASSES, jvp="forward_jvp")(fn, x, y)


def test_fd_eps_is_the_step_taken(monkeypatch):
    """fd_eps reaches the difference; a larger step moves du/dt by the truncation it predicts (order ε²)."""
    model = _model()
    x, y, kw = _fd_draws(torch.float64, seed=3)
    seen = spy_central_difference(monkeypatch, loss_mod)
    MeanFlowLoss(jvp="fd", fd_eps=1e-2)(model, x, y, **kw)
    MeanFlowLoss(jvp="fd", fd_eps=2e-2)(model, x, y, **kw)
    MeanFlowLoss(jvp="fd")(model, x, y, **kw)
    assert [c["eps"] for c in seen] == [1e-2, 2e-2, None]
    e1, e2 = ((c["out"] - seen[2]["out"]).norm() for c in seen[:2])
    assert 3.0 <= (e2 / e1).item() <= 5.0  # quadrupled with the doubled step
