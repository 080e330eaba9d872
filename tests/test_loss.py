"""MeanFlowLoss against a hand-written computation, the (t, r) sampler's statistics, and the
equivalence of its two JVP paths."""
import math
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from meanflow_fast import MeanFlowLoss, meanflow_dit, sample_t_r
from meanflow_fast.loss import check_settings
from tests.helpers import randomize_, rel_err

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


def hand_loss(model, x, y, t, r, noise, drop, omega, kappa, interval, p, c):
    """docs/DESIGN.md, "1 The MeanFlow objective", written out step by step, with torch.func.jvp for
    (u, du/dt)."""
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
