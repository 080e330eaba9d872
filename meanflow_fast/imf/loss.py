"""IMFLoss: the training objective of Improved MeanFlow (iMF, arXiv 2512.02012; docs/DESIGN.md,
"9 Improved MeanFlow (iMF): the objective").

    z = (1 − t)·x + t·ε,   v_t = ε − x,   h = t − r
    v_c, v_u = v_θ(z, t, 0, ω, 0, 1 | y), v_θ(z, t, 0, 1, 0, 1 | ∅)                      (no grad)
    flow-matching rows (r = t):  v_g = v_t + (1 − 1/ω)·(v_c − v_u)
    other rows: ω' = ω inside [t_min, t_max], else 1;  v_c' = v_θ(z, t, 0, ω', 0, 1 | y);
                v_g = v_t + (1 − 1/ω')·(v_c' − v_u)
    dropped labels: y → ∅ in the network call below, and v_g = v_t
    (u, du/dt, v) = JVP of (z, t, r) ↦ u_θ(z, t, t − r, ω, t_min, t_max | y) along (v_c', 1, 0), v as aux
    V = u + h·sg(du/dt)
    loss = mean_i [ w(Σ (V − sg v_g)²) + w(Σ (v − sg v_g)²) ],   w(ℓ) = ℓ / sg((ℓ + c)^p)
"""
import math
from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..jvp import central_difference_jvp
from ..checks import check_noise, check_row_draw, check_values, skip_value_checks, time_dtype
from ..loss import check_settings, generator_rand, generator_randn, jvp_safe_attention
from .model import IMFDiT

__all__ = ["IMFLoss"]


class IMFLoss(nn.Module):
    """Drop-in iMF loss. ``loss, stats = IMFLoss(...)(net, x, y)``.

    Args:
        num_classes: labels are in [0, num_classes); the null label is ``num_classes``. Defaults to
            ``net.num_classes`` at call time.
        time_mu, time_sigma: logit-normal parameters of the (t, r) draws (t the larger of two draws).
        ratio_r_neq_t: fraction of the batch with r ≠ t, as in MeanFlowLoss; the first
            int(B·(1 − ratio_r_neq_t)) rows get r = t (the official ``data_proportion`` is 1 − this).
        omega_max: the guidance scale is drawn as ω = omega_max^U, U ~ U(0, 1), so log ω is uniform
            on [0, log omega_max].
        t_min_range, t_max_range: the guidance interval's ends are drawn uniformly from these
            (flow-matching rows get [0, 1]); t_min_range's top must not exceed t_max_range's bottom.
        class_dropout: the probability behind the count of dropped labels: n = #{U_i < class_dropout},
            and the first n rows take the null label.
        adaptive_p, adaptive_c: w(ℓ) = ℓ / sg((ℓ + c)^p), as MeanFlowLoss's adaptive weight (the
            official ``norm_p``, ``norm_eps``).
        jvp: how du/dt is taken: "auto" (``forward_jvp`` for an IMFDiT, else "func"), "forward_jvp"
            (the net's own ``forward_jvp(z, t, h, ω, t_min, t_max, y, dz, dt, dh) -> (u, u̇, v)``), "func"
            (torch.func.jvp over ``net(...)``, any callable) or "fd" (a central finite difference,
            ``meanflow_fast.jvp.central_difference_jvp``, for nets forward-mode AD cannot run).
        fd_eps: the finite difference's step (default: ``default_step`` of the data's dtype, 5.6e-3 for
            float32). The difference needs the net to compute in float32 or float64: under bf16 autocast
            its rounding (~4e-3·|u|) divided by the step swamps du/dt; pass fd_eps ≈ 0.2 there and expect
            about two correct digits.
        validate: check the values of the inputs (labels in range, 0 ≤ r ≤ t ≤ 1, and any given ω,
            t_min, t_max), at one device sync; shapes always.

    The net is called as ``net(z, t, h, omega, t_min, t_max, y)`` with (B,) float tensors and (B,) int
    labels in [0, num_classes] (the null label is always used: the unconditional guidance call) and
    must return ``(u, v)`` shaped like z. An IMFDiT is called with ``heads=`` so that the guidance
    evaluations run the trunk and v-head only, and the finite difference the trunk and u-head only.

    ``forward`` returns the scalar loss and a dict of detached tensors: ``loss`` (weighted),
    ``loss_u`` and ``loss_v`` (the means of (V − v_g)² and (v − v_g)² over all elements: the numbers to
    watch), ``frac_r_neq_t`` and ``frac_guided`` (rows whose target carries guidance: not dropped, and
    r = t or t in [t_min, t_max]).
    """

    def __init__(self, num_classes: Optional[int] = None, *, time_mu: float = -0.4, time_sigma: float = 1.0,
                 ratio_r_neq_t: float = 0.5, omega_max: float = 8.0,
                 t_min_range: Tuple[float, float] = (0.0, 0.5), t_max_range: Tuple[float, float] = (0.5, 1.0),
                 class_dropout: float = 0.1, adaptive_p: float = 1.0, adaptive_c: float = 0.01,
                 jvp: str = "auto", fd_eps: Optional[float] = None, validate: bool = True):
        super().__init__()
        check_settings(time_sigma=time_sigma, ratio_r_neq_t=ratio_r_neq_t, guidance_interval=(0.0, 1.0),
                       class_dropout=class_dropout, adaptive_p=adaptive_p, adaptive_c=adaptive_c, jvp=jvp,
                       fd_eps=fd_eps)
        if not math.isfinite(time_mu):
            raise ValueError(f"time_mu must be finite, got {time_mu}")
        if not (omega_max >= 1.0 and math.isfinite(omega_max)):
            raise ValueError(f"omega_max must be ≥ 1 and finite (ω = omega_max^U ∈ [1, omega_max]), got "
                             f"{omega_max}")
        for name, rng in (("t_min_range", t_min_range), ("t_max_range", t_max_range)):
            if not (isinstance(rng, (tuple, list)) and len(rng) == 2 and 0.0 <= rng[0] <= rng[1] <= 1.0):
                raise ValueError(f"{name} must be a pair (lo, hi) with 0 ≤ lo ≤ hi ≤ 1, got {rng!r}")
        if t_min_range[1] > t_max_range[0]:
            raise ValueError(f"t_min_range's top must not exceed t_max_range's bottom (so that t_min ≤ t_max), "
                             f"got {tuple(t_min_range)} and {tuple(t_max_range)}")
        self.num_classes = num_classes
        self.time_mu, self.time_sigma, self.ratio_r_neq_t = time_mu, time_sigma, ratio_r_neq_t
        self.omega_max = float(omega_max)
        self.t_min_range = (float(t_min_range[0]), float(t_min_range[1]))
        self.t_max_range = (float(t_max_range[0]), float(t_max_range[1]))
        self.class_dropout, self.adaptive_p, self.adaptive_c = class_dropout, adaptive_p, adaptive_c
        self.jvp, self.fd_eps, self.validate = jvp, fd_eps, validate

    # ------------------------------------------------------------------------------------------
    def forward(self, net: Callable, x: torch.Tensor, y: torch.Tensor, *,
                t: Optional[torch.Tensor] = None, r: Optional[torch.Tensor] = None,
                noise: Optional[torch.Tensor] = None, omega: Optional[torch.Tensor] = None,
                t_min: Optional[torch.Tensor] = None, t_max: Optional[torch.Tensor] = None,
                drop: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """One iMF loss evaluation.

        x: (B, ...) clean data; y: (B,) int labels in [0, num_classes). Optional explicit draws to
        reproduce a step, each (B,): t, r (0 ≤ r ≤ t ≤ 1; the rows with r = t are the flow-matching
        rows), omega (≥ 1), t_min, t_max (0 ≤ t_min ≤ t_max ≤ 1), drop (bool: labels replaced by the
        null label), and noise (x's shape, dtype and device). Anything not given is drawn from
        ``generator``, in the official order: (t, r), noise, (t_min, t_max), ω, drop.
        """
        num_classes = self._num_classes(net)
        B = self._check(x, y, t, r, noise, omega, t_min, t_max, drop, num_classes)
        dev, tdt = x.device, time_dtype(x.dtype)
        if t is None:
            t, r, fm = self._draw_t_r(B, generator, dev)
        else:
            fm = (r.to(t.device) == t).to(dev)  # the flow-matching rows, read before any rounding
        t, r = t.to(dev, tdt), r.to(dev, tdt)
        if noise is None:
            noise = generator_randn(x.shape, generator, dev, x.dtype)
        if t_min is None:
            t_min, t_max = (lo + (hi - lo) * generator_rand((B,), generator, dev).to(tdt)
                            for lo, hi in (self.t_min_range, self.t_max_range))
            t_min, t_max = torch.where(fm, 0.0, t_min), torch.where(fm, 1.0, t_max)
        t_min, t_max = t_min.to(dev, tdt), t_max.to(dev, tdt)
        if omega is None:
            omega = torch.exp(generator_rand((B,), generator, dev).to(tdt) * math.log(self.omega_max))
        omega = omega.to(dev, tdt)
        if drop is None:
            count = (generator_rand((B,), generator, dev) < self.class_dropout).sum()
            drop = torch.arange(B, device=dev) < count
        drop = drop.to(dev)

        bshape = (B,) + (1,) * (x.dim() - 1)
        tb = t.view(bshape).to(x.dtype)
        z = (1 - tb) * x + tb * noise
        v_t = noise - x
        fast = isinstance(net, IMFDiT)
        # The net's own value checks would repeat the ones above (or read values against validate=False).
        covered = not self.validate or getattr(net, "num_classes", num_classes) == num_classes
        vouch = skip_value_checks if covered else nullcontext

        inside = (t >= t_min) & (t <= t_max)
        with _null_label_hint(num_classes), vouch():
            v_g, v_c = self._guidance(net, fast, z, t, v_t, y, fm, inside, omega, num_classes)
        v_g = torch.where(drop.view(bshape), v_t, v_g)  # class dropout, after guidance
        y_in = torch.where(drop, torch.full_like(y, num_classes), y)

        h = t - r
        with _null_label_hint(num_classes), vouch():
            u, dudt, v = self._jvp(net, fast, z, t, r, h, omega, t_min, t_max, y_in, v_c)
        V = u + h.view(bshape).to(dudt.dtype) * dudt
        acc = torch.promote_types(u.dtype, torch.float32)  # fp32 sums for fp16/bf16, fp64 stays fp64
        target = v_g.detach().to(acc)
        sq_u, sq_v = (V.to(acc) - target).pow(2), (v.to(acc) - target).pow(2)
        loss = (self._weighted(sq_u.flatten(1).sum(1)) + self._weighted(sq_v.flatten(1).sum(1))).mean()
        stats = {"loss": loss.detach(), "loss_u": sq_u.detach().mean(), "loss_v": sq_v.detach().mean(),
                 "frac_r_neq_t": (~fm).float().mean(), "frac_guided": (~drop & (fm | inside)).float().mean()}
        return loss, stats

    # ------------------------------------------------------------------------------------------
    def _weighted(self, ell: torch.Tensor) -> torch.Tensor:
        return ell / (ell.detach() + self.adaptive_c).pow(self.adaptive_p)

    def _num_classes(self, net) -> int:
        n = self.num_classes if self.num_classes is not None else getattr(net, "num_classes", None)
        if n is None:
            raise ValueError("num_classes is unknown: pass IMFLoss(num_classes=...) for a net without a "
                             "num_classes attribute")
        return int(n)

    def _draw_t_r(self, B: int, generator, device):
        """t, r = max, min of two logit-normal draws; the first int(B·(1 − ratio_r_neq_t)) rows get r = t."""
        s = torch.sigmoid(self.time_mu + self.time_sigma * generator_randn((2, B), generator, device))
        t, r = s.max(dim=0).values, s.min(dim=0).values
        # B − ceil(B·ratio) = int(B·(1 − ratio)), with sample_t_r's rounding against float error.
        n_fm = B - math.ceil(round(B * self.ratio_r_neq_t, 9))
        fm = torch.arange(B, device=device) < n_fm
        return t, torch.where(fm, t, r), fm

    @torch.no_grad()
    def _guidance(self, net, fast, z, t, v_t, y, fm, inside, omega, num_classes):
        """(v_g, v_c') before class dropout. The three v evaluations, (ω | y), (1 | ∅) and (ω' | y), go in
        one batch of 3B rows: none depends on another's output."""
        bshape = (z.shape[0],) + (1,) * (z.dim() - 1)
        w_in = torch.where(inside, omega, 1.0)
        w3 = torch.cat([omega, torch.ones_like(omega), w_in])
        y3 = torch.cat([y, torch.full_like(y, num_classes), y])
        t3 = torch.cat([t, t, t])
        z3 = torch.cat([z, z, z])
        zero, one = torch.zeros_like(t3), torch.ones_like(t3)
        if fast:
            out = net(z3, t3, zero, w3, zero, one, y3, heads="v")
        else:
            out = _pair(net(z3, t3, zero, w3, zero, one, y3))[1]
        v_c, v_u, v_c_in = out.to(v_t.dtype).chunk(3)
        scale = lambda w: (1 - 1 / w).view(bshape).to(v_t.dtype)  # noqa: E731
        v_g = torch.where(fm.view(bshape), v_t + scale(omega) * (v_c - v_u), v_t + scale(w_in) * (v_c_in - v_u))
        return v_g, v_c_in

    def _mode(self, net, fast) -> str:
        mode = self.jvp
        if mode == "auto":
            return "forward_jvp" if fast else "func"
        if mode == "forward_jvp" and not callable(getattr(net, "forward_jvp", None)):
            raise ValueError("jvp='forward_jvp' needs a net with a forward_jvp(z, t, h, omega, t_min, t_max, y, dz, "
                             "dt, dh) -> (u, u_dot, v) method; use jvp='func' or 'fd' for this net")
        return mode

    def _jvp(self, net, fast, z, t, r, h, omega, t_min, t_max, y, v_c):
        """(u, du/dt, v) along (ż, ṫ, ṙ) = (v_c', 1, 0); du/dt is detached, u and v carry their graphs."""
        mode = self._mode(net, fast)
        if mode == "forward_jvp":
            u, dudt, v = net.forward_jvp(z, t, h, omega, t_min, t_max, y, v_c.to(z.dtype), dt=1.0, dh=1.0)
            return u, dudt.detach(), v
        if mode == "func":
            def fn(z_, t_, r_):
                return _pair(net(z_, t_, t_ - r_, omega, t_min, t_max, y))
            with jvp_safe_attention():
                u, dudt, v = torch.func.jvp(fn, (z, t, r), (v_c.to(z.dtype), torch.ones_like(t), torch.zeros_like(r)),
                                            has_aux=True)
            return u, dudt.detach(), v
        # "fd": u and v from one call with grad; du/dt from one no-grad call of the u part at the two shifted
        # points (2B rows), kept in t + s ≤ 1 and h + s ≥ 0 (one-sided where a central step would leave them).
        u, v = _pair(net(z, t, h, omega, t_min, t_max, y))

        def u_fn(z_, t_, r_, omega_, t_min_, t_max_, y_):
            if fast:
                return net(z_, t_, t_ - r_, omega_, t_min_, t_max_, y_, heads="u")
            return _pair(net(z_, t_, t_ - r_, omega_, t_min_, t_max_, y_))[0]
        dudt = central_difference_jvp(u_fn, (z, t, r, omega, t_min, t_max, y),
                                      (v_c.to(z.dtype), torch.ones_like(t), None, None, None, None, None),
                                      self.fd_eps, step_range=(-h, 1 - t), f0=u, stacked=True)
        return u, dudt, v

    def _check(self, x, y, t, r, noise, omega, t_min, t_max, drop, num_classes) -> int:
        if not torch.is_tensor(x) or x.dim() < 2:
            raise ValueError(f"x must be a (B, ...) tensor, got "
                             f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        B = x.shape[0]
        if B == 0:
            raise ValueError("x is an empty batch (B = 0)")
        if not x.is_floating_point():
            raise ValueError(f"x must be floating point, got {x.dtype}")
        if (not torch.is_tensor(y) or y.shape != (B,) or y.is_floating_point() or y.is_complex()
                or y.dtype == torch.bool):
            desc = f"{y.dtype} {tuple(y.shape)}" if torch.is_tensor(y) else type(y).__name__
            raise ValueError(f"y must be an integer tensor of shape ({B},), got {desc}")
        if y.device != x.device:
            raise ValueError(f"y is on {y.device} but x is on {x.device}")
        for (a, sa), (b, sb) in ((("t", t), ("r", r)), (("t_min", t_min), ("t_max", t_max))):
            if (sa is None) != (sb is None):
                raise ValueError(f"pass {a} and {b} together (or neither)")
        for name, s in (("t", t), ("r", r), ("omega", omega), ("t_min", t_min), ("t_max", t_max)):
            if s is not None:
                check_row_draw(name, s, B)
        if noise is not None:
            check_noise(noise, x)
        if drop is not None:
            check_row_draw("drop", drop, B, boolean=True)
        if self.validate:  # data labels (no null label), the given times, ω and interval, at one sync
            dev = y.device
            check_values(y, num_classes, *((None, None) if t is None else (r.to(dev), t.to(dev))), null_label=False,
                         intervals=() if t_min is None else (("t_min", t_min.to(dev), "t_max", t_max.to(dev)),),
                         lower_bounds=() if omega is None else (("omega", omega.to(dev), 1.0,
                                                                 "the guidance scale; 1 = no guidance"),))
        return B


def _pair(out):
    """The net's (u, v), checked."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(torch.is_tensor(o) for o in out)):
        raise ValueError(f"the net must return a pair (u, v) of tensors, got "
                         f"{type(out).__name__}{f' of length {len(out)}' if isinstance(out, (tuple, list)) else ''}")
    return tuple(out)


@contextmanager
def _null_label_hint(num_classes: int):
    """Re-raise an IndexError from a net call as a ValueError naming the null label, which iMF always uses
    (the unconditional guidance call)."""
    try:
        yield
    except IndexError as err:
        raise ValueError(
            f"the net raised IndexError on labels holding the null label {num_classes}: a net trained with "
            f"IMFLoss must accept the label {num_classes} (the null label of guidance's unconditional call and "
            f"of class dropout), e.g. a label embedding of num_classes + 1 rows") from err
