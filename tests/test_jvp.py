"""central_difference_jvp against closed forms: f = sin(W·x + c·τ) along a direction has every derivative
in closed form, so the stencils' values, the stated error bound and the nodes near a range's ends can
all be checked by hand."""
import pytest
import torch

from meanflow_fast.jvp import central_difference_jvp, default_step


def _problem(B=5, n=3, m=4, dtype=torch.float64):
    """f(x, τ) = sin(x Wᵀ + c τ) row-wise: x (B, n), τ (B,), out (B, m); a direction (dx, dτ)."""
    g = torch.Generator().manual_seed(B * 100 + n)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    c = torch.randn(m, generator=g, dtype=torch.float64)
    x = torch.randn(B, n, generator=g, dtype=torch.float64)
    tau = torch.rand(B, generator=g, dtype=torch.float64)
    dx = torch.randn(B, n, generator=g, dtype=torch.float64)
    dtau = torch.randn(B, generator=g, dtype=torch.float64)

    def f(x_, tau_):
        return torch.sin(x_ @ W.to(x_.dtype).T + tau_[:, None] * c.to(x_.dtype))

    theta = x @ W.T + tau[:, None] * c             # (B, m), fp64
    beta = dx @ W.T + dtau[:, None] * c            # d/ds of the argument along the direction
    cast = lambda a: a.to(dtype)  # noqa: E731
    return f, (cast(x), cast(tau)), (cast(dx), cast(dtau)), theta, beta, (W, c)


def _rounding_bound(dtype, x, tau, dx, dtau, W, c, s_max):
    """δ: a bound on the absolute error of one fp evaluation of f at p + s·d, |s| ≤ s_max, elementwise:
    forming x + s·dx and τ + s·dτ, the n-term product-sum, and sin, each a few units of roundoff u."""
    u = torch.finfo(dtype).eps / 2
    n = x.shape[1]
    ax = x.double().abs() + s_max * dx.double().abs()
    at = tau.double().abs() + s_max * dtau.double().abs()
    scale = ax @ W.abs().T + at[:, None] * c.abs()
    return 4 * (n + 3) * u * scale + 2 * u


def test_default_step_balances_truncation_and_rounding():
    # (3u)^(1/3) with u = 2^-24 and 2^-53: worked by hand as 5.6335e-3 and 6.9318e-6
    assert default_step(torch.float32) == pytest.approx(5.6335e-3, rel=1e-4)
    assert default_step(torch.float64) == pytest.approx(6.9318e-6, rel=1e-4)
    assert default_step(torch.float16) > default_step(torch.float32)
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        default_step(torch.int64)


def test_central_difference_is_the_closed_form():
    """(sin(θ + βε) − sin(θ − βε)) / 2ε = cos θ · sin(βε)/ε, exactly, at a large ε."""
    f, p, d, theta, beta, _ = _problem()
    eps = 0.05
    got = central_difference_jvp(f, p, d, eps)
    assert torch.allclose(got, torch.cos(theta) * torch.sin(beta * eps) / eps, rtol=0, atol=1e-13)
    # the leading error term is ε²/6 · g''' with g''' = −β³ cos θ: the scheme is second order
    err = got - beta * torch.cos(theta)
    lead = -(eps ** 2) / 6 * beta ** 3 * torch.cos(theta)
    assert torch.allclose(err, lead, rtol=0, atol=(eps ** 4 / 120 * beta.abs() ** 5).max().item() * 1.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_central_difference_within_the_stated_bound(dtype):
    """|D − f'| ≤ ε²/6·M₃ + δ/ε at the default step, with M₃ = |β|³ (an exact sup: g''' = −β³ cos) and δ
    the evaluation's rounding bound; the bound itself is small (the test has teeth)."""
    f, p, d, theta, beta, (W, c) = _problem(B=7, dtype=dtype)
    eps = default_step(dtype)
    got = central_difference_jvp(f, p, d)
    exact = beta * torch.cos(theta)
    delta = _rounding_bound(dtype, *p, *d, W, c, eps)
    bound = eps ** 2 / 6 * beta.abs() ** 3 + delta / eps
    err = (got.double() - exact).abs()
    assert got.dtype == dtype
    assert bool((err <= bound).all()), (err / bound).max()
    assert bound.max() <= (3e-3 if dtype == torch.float32 else 1e-8) * exact.abs().max()


def _nodes_hit(f):
    """Wrap f to record every τ it is evaluated at."""
    seen = []

    def g(x_, tau_):
        seen.append(tau_.detach().clone())
        return f(x_, tau_)
    return g, seen


def test_one_sided_rows_near_the_ends_of_a_range():
    """Rows take central (−ε, ε), forward (ε, 2ε), backward (−ε, −2ε), narrow (w/2, w) or no step by the
    room in step_range; every evaluation stays in the range, and each row equals its hand-written
    three-point formula and meets its stated bound."""
    f, (x, tau), (dx, dtau), theta, beta, (W, c) = _problem(B=7)
    dtau = torch.ones_like(tau)  # s moves τ by s: the recorded τ − τ₀ are the nodes
    beta = dx @ W.T + c
    eps = 1e-3
    inf = float("inf")
    lo = torch.tensor([-inf, 0.0, -1.0, -0.3 * eps, -0.2 * eps, 0.0, -0.5 * eps], dtype=torch.float64)
    hi = torch.tensor([inf, 1.0, 0.0, 0.6 * eps, 0.1 * eps, 0.0, 1.5 * eps], dtype=torch.float64)
    fn, seen = _nodes_hit(f)
    got = central_difference_jvp(fn, (x, tau), (dx, dtau), eps, step_range=(lo, hi))
    steps = torch.stack([s - tau for s in seen])  # (calls, B): f0's call, then the two shifted ones
    assert bool(((steps >= lo - 1e-15) & (steps <= hi + 1e-15)).all())

    g = lambda s: torch.sin(theta + beta * s)  # noqa: E731  (f along the direction, fp64)
    e = eps
    w4 = -0.2 * e  # row 4: the wider side is below
    by_hand = torch.stack([
        (g(e) - g(-e)) / (2 * e),                                   # central
        (-3 * g(0) + 4 * g(e) - g(2 * e)) / (2 * e),                # forward
        (3 * g(0) - 4 * g(-e) + g(-2 * e)) / (2 * e),               # backward
        (-3 * g(0) + 4 * g(0.3 * e) - g(0.6 * e)) / (0.6 * e),      # narrow, w = 0.6ε above
        (-3 * g(0) + 4 * g(w4 / 2) - g(w4)) / w4,                   # narrow, w = 0.2ε below
        torch.zeros_like(g(0)),                                     # no room
        (-3 * g(0) + 4 * g(0.75 * e) - g(1.5 * e)) / (1.5 * e),    # ε ≤ room above < 2ε, < ε below
    ])
    rows = torch.arange(7)
    assert torch.allclose(got, by_hand[rows, rows], rtol=0, atol=1e-9)
    exact = beta * torch.cos(theta)
    M3 = beta.abs() ** 3
    u = torch.finfo(torch.float64).eps / 2
    delta = 64 * u
    bound = torch.stack([e ** 2 / 6 * M3[0] + delta / e, e ** 2 / 3 * M3[1] + 4 * delta / e,
                         e ** 2 / 3 * M3[2] + 4 * delta / e, (0.6 * e) ** 2 / 12 * M3[3] + 8 * delta / (0.6 * e),
                         (0.2 * e) ** 2 / 12 * M3[4] + 8 * delta / (0.2 * e),
                         (1.5 * e) ** 2 / 12 * M3[6] + 8 * delta / (1.5 * e)])
    keep = torch.tensor([0, 1, 2, 3, 4, 6])
    assert bool(((got[keep] - exact[keep]).abs() <= bound).all())


def test_f0_stacked_and_fixed_primals():
    """A given f0 is used as is; stacked (one 2B call) equals two calls; a primal with tangent None
    (integer labels here) reaches fn unchanged, and is concatenated with itself when stacked."""
    f, (x, tau), (dx, dtau), *_ = _problem(B=4)
    labels = torch.tensor([3, 1, 4, 1])
    calls = []

    def fn(x_, tau_, y_):
        calls.append((x_.shape[0], y_.clone()))
        return f(x_, tau_) * (1 + y_[:, None])
    lo, hi = torch.tensor([-1.0, 0.0, -1.0, 0.0], dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    a = central_difference_jvp(fn, (x, tau, labels), (dx, dtau, None), 1e-4, step_range=(lo, hi))
    assert [n for n, _ in calls] == [4, 4, 4] and all(torch.equal(y_, labels) for _, y_ in calls)
    calls.clear()
    f0 = fn(x, tau, labels)
    calls.clear()
    b = central_difference_jvp(fn, (x, tau, labels), (dx, dtau, None), 1e-4, step_range=(lo, hi), f0=f0, stacked=True)
    assert [n for n, _ in calls] == [8] and torch.equal(calls[0][1], torch.cat([labels, labels]))
    assert torch.allclose(a, b, rtol=1e-13, atol=0)
    # a wrong f0 is used, not recomputed: the forward rows change, the central rows (c₀ = 0) do not
    c = central_difference_jvp(fn, (x, tau, labels), (dx, dtau, None), 1e-4, step_range=(lo, hi), f0=f0 + 1)
    assert torch.allclose(c[0], a[0], rtol=1e-9, atol=0) and not torch.allclose(c[1], a[1], rtol=1e-3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(tangents=(None, None)), "at least one entry must be a tensor"),
    (dict(tangents=(torch.zeros(4, 3),)), "same length"),
    (dict(tangents=(torch.zeros(4, 2, dtype=torch.float64), None)), r"tangents\[0\] must be a tensor shaped like"),
    (dict(tangents=(torch.zeros(4, 3), None)), r"tangents\[0\] must be a tensor shaped like"),
    (dict(eps=0.0), "eps must be a finite float > 0"),
    (dict(eps=float("nan")), "eps must be a finite float > 0"),
    (dict(step_range=(0.1, 1.0)), "lo ≤ 0 ≤ hi"),
    (dict(step_range=(-1.0,)), "step_range must be a pair"),
    (dict(step_range=(torch.zeros(3, dtype=torch.float64), 1.0)), r"float tensor of shape \(4,\)"),
    (dict(fn="not callable"), "fn must be callable"),
    (dict(fn=lambda x_, y_: (x_, x_)), "fn must return a tensor"),
    (dict(f0=torch.zeros(2)), "f0 must be fn"),
])
def test_rejects_bad_arguments(kwargs, match):
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.arange(4)
    args = dict(fn=lambda x_, y_: torch.sin(x_), primals=(x, y), tangents=(torch.ones_like(x), None), eps=1e-3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        central_difference_jvp(args.pop("fn"), args.pop("primals"), args.pop("tangents"), args.pop("eps"), **args)


def test_rejects_a_moved_integer_primal_and_unbatched_stacking():
    y = torch.arange(4)
    with pytest.raises(ValueError, match=r"primals\[0\] has a tangent, so it must be a floating-point tensor"):
        central_difference_jvp(lambda y_: y_.double(), (y,), (torch.ones(4),))
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="every tensor primal must have the batch B as dim 0"):
        central_difference_jvp(lambda x_, w_: x_ * w_.sum(), (x, torch.ones(5)), (torch.ones_like(x), None),
                               stacked=True)
    with pytest.raises(ValueError, match="2B = 8 rows"):
        central_difference_jvp(lambda x_: x_.sum(0, keepdim=True), (x,), (torch.ones_like(x),), stacked=True)
