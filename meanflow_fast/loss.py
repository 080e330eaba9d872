"""MeanFlowLoss: the training objective of MeanFlow (arXiv 2505.13447, Algorithm 1; docs/DESIGN.md,
"1 The MeanFlow objective").

    z_t = (1 − t)·x + t·ε,   v = ε − x
    (u, du/dt) = JVP(u_θ, (z_t, r, t), (ṽ, 0, 1))
    u_tgt = stopgrad(ṽ − clip(t − r, 0, 1)·du/dt)
    L_i = Σ_{C,H,W} (u − u_tgt)²,   w_i = stopgrad(1/(L_i + c)^p),   loss = mean_i(w_i·L_i)

with the guided velocity (paper eq. 19/21), for samples whose t is in the guidance interval and whose
class was not dropped:  ṽ = ω·v + κ·u(z_t, t, t | c) + (1 − ω − κ)·u(z_t, t, t | ∅)  (no grad).
"""
import math
from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .checks import check_noise, check_row_draw, check_values, skip_value_checks, time_dtype
from .jvp import central_difference_jvp

__all__ = ["MeanFlowLoss", "sample_t_r", "check_settings"]

# How a loss takes du/dt (MeanFlowLoss, IMFLoss): "auto" picks "forward_jvp" (the model's own explicit
# rules) or "func" (torch.func.jvp); "fd" is a finite difference (meanflow_fast.jvp).
JVP_MODES = ("auto", "forward_jvp", "func", "fd")


# Shared with IMFLoss: draws from a generator that may live on another device, and the SDPA switch for
# torch.func.jvp.
def generator_randn(shape, generator, device, dtype=torch.float32):
    """Gaussian draws on the generator's device (reproducible), then moved to ``device``."""
    gdev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gdev, dtype=dtype).to(device)


def generator_rand(shape, generator, device):
    """Uniform [0, 1) draws on the generator's device (reproducible), then moved to ``device``."""
    gdev = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gdev).to(device)


def jvp_safe_attention():
    """The fused SDPA kernels (CPU included) have no forward-AD rule: for any model run under
    torch.func.jvp, restrict F.scaled_dot_product_attention to the math backend."""
    return sdpa_kernel([SDPBackend.MATH])


def sample_t_r(batch: int, *, mu: float = -0.4, sigma: float = 1.0, ratio_r_neq_t: float = 0.25,
               generator: Optional[torch.Generator] = None, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw (t, r), each (batch,) float32 with 0 < r ≤ t < 1.

    Two independent logit-normal(mu, sigma) draws; t = max, r = min; then int(batch · (1 − ratio_r_neq_t))
    samples, chosen at random, are set to r = t (the official rule: one r ≠ t sample remains at batch 1
    or 2 for any ratio > 0).
    """
    if batch < 1:
        raise ValueError(f"batch must be ≥ 1, got {batch}")
    if not 0.0 <= ratio_r_neq_t <= 1.0:
        raise ValueError(f"ratio_r_neq_t must be in [0, 1], got {ratio_r_neq_t}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    s = torch.sigmoid(mu + sigma * generator_randn((2, batch), generator, device))
    t, r = s.max(dim=0).values, s.min(dim=0).values
    gdev = generator.device if generator is not None else device
    # batch − int(batch·(1 − ratio)) = ceil(batch·ratio); rounded to 9 decimals first so that a decimal
    # ratio is not off by one row through float error (int(90 · 0.7) is 62 in floats).
    n_neq = math.ceil(round(batch * ratio_r_neq_t, 9))
    equal = torch.randperm(batch, generator=generator, device=gdev)[n_neq:]
    r[equal.to(device)] = t[equal.to(device)]
    return t, r


def check_settings(*, time_sigma: float, ratio_r_neq_t: float, guidance_interval: Tuple[float, float],
                   class_dropout: float, adaptive_p: float, adaptive_c: float, omega: float = 1.0,
                   kappa: float = 0.0, jvp: str = "auto", fd_eps: Optional[float] = None,
                   name: Callable[[str], str] = str) -> None:
    """Raise ValueError for a MeanFlowLoss (or IMFLoss) setting out of its range. ``name`` spells each
    setting in the message (``meanflow-train`` passes its flag names: ``time_sigma`` → ``--time-sigma``).

    Guidance: ω ≥ 0 (ω = 0 is guidance scale 0) and 0 ≤ κ < 1, since the effective scale is ω/(1 − κ)
    (κ = 1 makes it infinite); both finite. ``jvp`` one of ``JVP_MODES``; ``fd_eps`` None or a finite
    float > 0."""
    if jvp not in JVP_MODES:
        raise ValueError(f"{name('jvp')} must be one of {JVP_MODES}, got {jvp!r}")
    if fd_eps is not None and not (isinstance(fd_eps, (int, float)) and not isinstance(fd_eps, bool)
                                   and math.isfinite(fd_eps) and fd_eps > 0):
        raise ValueError(f"{name('fd_eps')} must be None (the dtype's default step) or a finite float > 0, got "
                         f"{fd_eps!r}")
    lo, hi = guidance_interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"{name('guidance_interval')} must satisfy 0 ≤ T_LO ≤ T_HI ≤ 1, got {lo} {hi}")
    if not 0.0 <= class_dropout < 1.0:
        raise ValueError(f"{name('class_dropout')} must be in [0, 1), got {class_dropout}")
    if not 0.0 <= ratio_r_neq_t <= 1.0:
        raise ValueError(f"{name('ratio_r_neq_t')} must be in [0, 1], got {ratio_r_neq_t}")
    if time_sigma <= 0:
        raise ValueError(f"{name('time_sigma')} must be > 0, got {time_sigma}")
    if not (omega >= 0.0 and math.isfinite(omega)):
        raise ValueError(f"{name('omega')} must be ≥ 0 and finite, got {omega}")
    if not 0.0 <= kappa < 1.0:
        raise ValueError(f"{name('kappa')} must be in [0, 1) (the effective guidance scale is "
                         f"{name('omega')}/(1 − {name('kappa')})), got {kappa}")
    if adaptive_c <= 0 or adaptive_p < 0:
        raise ValueError(f"{name('adaptive_c')} must be > 0 and {name('adaptive_p')} ≥ 0, got "
                         f"c={adaptive_c}, p={adaptive_p}")


class MeanFlowLoss(nn.Module):
    """Drop-in MeanFlow loss. ``loss, stats = MeanFlowLoss(...)(model, x, y)``.

    Args:
        num_classes: labels are in [0, num_classes); the null label is ``num_classes``. Defaults to
            ``model.num_classes`` at call time.
        time_mu, time_sigma: logit-normal parameters of the (t, r) draws.
        ratio_r_neq_t: fraction of the batch with r ≠ t (the rest has r = t). 0 gives flow matching.
        omega, kappa, guidance_interval: training-time guidance (ω ≥ 0, 0 ≤ κ < 1, [t_lo, t_hi]); the
            effective scale is ω/(1 − κ); ω = 1, κ = 0 is unguided and skips the two extra evaluations.
        class_dropout: probability of replacing a label with the null label.
        adaptive_p, adaptive_c: adaptive weight w = 1/(L + c)^p (p = 0 gives the plain mean of L).
        jvp: how du/dt is taken, one of ``JVP_MODES``: "auto" (``model.forward_jvp`` if the model has it,
            else "func"), "forward_jvp" (the model's own ``forward_jvp(z, r, t, y, dz) -> (u, u̇)``),
            "func" (torch.func.jvp over ``model(z, r, t, y)``, any callable) or "fd" (a finite difference,
            ``meanflow_fast.jvp.central_difference_jvp``, for models forward-mode AD cannot run: FSDP,
            attention kernels without a forward-AD rule). "fd" takes u from one call with grad and du/dt
            from one no-grad call of 2B rows at t ± ε along (ṽ, 0, 1), one-sided where a central step
            would leave r ≤ t + s ≤ 1; its error per element is within the bound that
            ``central_difference_jvp`` states (about 1.6e-5·|u| in float32, 2.4e-11·|u| in float64 with
            the default step), and it enters the target scaled by t − r.
        fd_eps: the finite difference's step (default: ``default_step`` of the data's dtype, 5.6e-3 for
            float32). The difference needs the model to compute in float32 or float64: under bf16
            autocast its rounding (~4e-3·|u|) divided by the step swamps du/dt; pass fd_eps ≈ 0.2 there
            and expect about two correct digits.
        validate: check the values of the inputs (labels in range, 0 ≤ r ≤ t ≤ 1), which costs one
            device sync per call and a graph break under torch.compile; shapes are always checked.
            A MeanFlowDiT's own value checks are skipped inside the loss, whose draws are valid by
            construction (``meanflow_fast.checks.skip_value_checks``), unless the loss's num_classes is
            not the model's; ``validate=False`` skips them as well.

    The model is called as ``model(z, r, t, y)`` with r, t (B,) float tensors and y (B,) int labels in
    [0, num_classes]: it must accept the null label ``num_classes`` (class dropout, on by default, and
    guidance's unconditional call use it). An IndexError raised by a call holding the null label is
    re-raised as a ValueError saying so (on CUDA an out-of-range embedding is a device-side assert).

    ``forward`` returns the scalar loss and a dict of detached tensors: ``loss`` (weighted),
    ``raw_loss`` (mean of L_i: the number to watch; the weighted loss sits near 1) and ``frac_r_neq_t``.
    """

    def __init__(self, num_classes: Optional[int] = None, *, time_mu: float = -0.4, time_sigma: float = 1.0,
                 ratio_r_neq_t: float = 0.25, omega: float = 1.0, kappa: float = 0.0,
                 guidance_interval: Tuple[float, float] = (0.0, 1.0), class_dropout: float = 0.1,
                 adaptive_p: float = 1.0, adaptive_c: float = 0.01, jvp: str = "auto",
                 fd_eps: Optional[float] = None, validate: bool = True):
        super().__init__()
        check_settings(time_sigma=time_sigma, ratio_r_neq_t=ratio_r_neq_t, guidance_interval=guidance_interval,
                       class_dropout=class_dropout, adaptive_p=adaptive_p, adaptive_c=adaptive_c,
                       omega=omega, kappa=kappa, jvp=jvp, fd_eps=fd_eps)
        lo, hi = guidance_interval
        self.num_classes = num_classes
        self.time_mu, self.time_sigma, self.ratio_r_neq_t = time_mu, time_sigma, ratio_r_neq_t
        self.omega, self.kappa, self.guidance_interval = omega, kappa, (float(lo), float(hi))
        self.class_dropout, self.adaptive_p, self.adaptive_c, self.jvp = class_dropout, adaptive_p, adaptive_c, jvp
        self.fd_eps, self.validate = fd_eps, validate

    @property
    def guided(self) -> bool:
        return self.omega != 1.0 or self.kappa != 0.0

    # ------------------------------------------------------------------------------------------
    def forward(self, model: Callable, x: torch.Tensor, y: torch.Tensor, *,
                t: Optional[torch.Tensor] = None, r: Optional[torch.Tensor] = None,
                noise: Optional[torch.Tensor] = None, drop: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """One MeanFlow loss evaluation.

        x: (B, ...) clean data; y: (B,) int labels in [0, num_classes). Optional explicit draws to
        reproduce a step: t, r (B,) with 0 ≤ r ≤ t ≤ 1; noise shaped like x; drop (B,) bool mask of
        labels replaced by the null label. Anything not given is drawn from ``generator``.
        """
        num_classes = self._num_classes(model)
        B = self._check(x, y, t, r, noise, drop, num_classes)
        dev = x.device
        # Flow matching (r = t everywhere, target v) needs no tangent: decided without looking at values.
        flow_matching = self.ratio_r_neq_t == 0.0 and t is None
        if t is None:
            t, r = sample_t_r(B, mu=self.time_mu, sigma=self.time_sigma, ratio_r_neq_t=self.ratio_r_neq_t,
                              generator=generator, device=dev)
        tdt = time_dtype(x.dtype)
        t, r = t.to(dev, tdt), r.to(dev, tdt)
        if noise is None:
            noise = generator_randn(x.shape, generator, dev, x.dtype)
        if drop is None:
            drop = generator_rand((B,), generator, dev) < self.class_dropout
        drop = drop.to(dev)
        y_in = torch.where(drop, torch.full_like(y, num_classes), y)

        bshape = (B,) + (1,) * (x.dim() - 1)
        tb = t.view(bshape).to(x.dtype)
        z = (1 - tb) * x + tb * noise
        v = noise - x
        # A MeanFlowDiT's value checks would repeat _check's (same num_classes) or undo validate=False.
        covered = not self.validate or getattr(model, "num_classes", num_classes) == num_classes
        vouch = skip_value_checks if covered else nullcontext
        v_tilde = self._guided_velocity(model, z, t, y, v, drop, num_classes, vouch) if self.guided else v

        with _null_label_hint(num_classes, drop), vouch():
            if flow_matching:
                u = model(z, r, t, y_in)
                dudt = torch.zeros_like(u)
            else:
                u, dudt = self._jvp(model, z, r, t, y_in, v_tilde)
        with torch.no_grad():
            u_tgt = v_tilde - (t - r).clamp(0, 1).view(bshape).to(dudt.dtype) * dudt
        acc = torch.promote_types(u.dtype, torch.float32)  # fp32 sums for fp16/bf16, fp64 stays fp64
        err = (u.to(acc) - u_tgt.to(acc)).pow(2).flatten(1).sum(1)  # L_i, (B,)
        w = 1.0 / (err.detach() + self.adaptive_c).pow(self.adaptive_p)
        loss = (w * err).mean()
        stats = {"loss": loss.detach(), "raw_loss": err.detach().mean(),
                 "frac_r_neq_t": (r != t).float().mean()}
        return loss, stats

    # ------------------------------------------------------------------------------------------
    def _num_classes(self, model) -> int:
        n = self.num_classes if self.num_classes is not None else getattr(model, "num_classes", None)
        if n is None:
            raise ValueError("num_classes is unknown: pass MeanFlowLoss(num_classes=...) for a model "
                             "without a num_classes attribute")
        return int(n)

    @torch.no_grad()
    def _guided_velocity(self, model, z, t, y, v, drop, num_classes, vouch=nullcontext):
        """ṽ = ω·v + κ·u(z, t, t | c) + (1 − ω − κ)·u(z, t, t | ∅) inside the interval, else v."""
        B = z.shape[0]
        lo, hi = self.guidance_interval
        use = (t >= lo) & (t <= hi) & ~drop
        # One batched call for the conditional and unconditional predictions.
        with _null_label_hint(num_classes), vouch():
            u_both = model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t]),
                           torch.cat([y, torch.full_like(y, num_classes)]))
        u_c, u_u = u_both[:B].to(v.dtype), u_both[B:].to(v.dtype)
        v_g = self.omega * v + self.kappa * u_c + (1 - self.omega - self.kappa) * u_u
        return torch.where(use.view((B,) + (1,) * (v.dim() - 1)), v_g, v)

    def _mode(self, model) -> str:
        mode = self.jvp
        if mode == "auto":
            return "forward_jvp" if hasattr(model, "forward_jvp") else "func"
        if mode == "forward_jvp" and not callable(getattr(model, "forward_jvp", None)):
            raise ValueError("jvp='forward_jvp' needs a model with a forward_jvp(z, r, t, y, dz) -> (u, u_dot) "
                             "method; use jvp='func' or 'fd' for this model")
        return mode

    def _jvp(self, model, z, r, t, y, v_tilde):
        """(u, du/dt) along (ż, ṙ, ṫ) = (ṽ, 0, 1); du/dt is detached, u carries its graph."""
        mode = self._mode(model)
        if mode == "forward_jvp":
            u, dudt = model.forward_jvp(z, r, t, y, v_tilde)
            return u, dudt.detach()
        if mode == "func":
            with jvp_safe_attention():
                u, dudt = torch.func.jvp(lambda z_, r_, t_: model(z_, r_, t_, y), (z, r, t),
                                         (v_tilde, torch.zeros_like(r), torch.ones_like(t)))
            return u, dudt.detach()
        # "fd": u from one call with grad; du/dt from one no-grad call at the two shifted points (2B rows),
        # kept in r ≤ t + s ≤ 1 (one-sided where a central step would leave it).
        u = model(z, r, t, y)
        dudt = central_difference_jvp(model, (z, r, t, y), (v_tilde.to(z.dtype), None, torch.ones_like(t), None),
                                      self.fd_eps, step_range=(r - t, 1 - t), f0=u, stacked=True)
        return u, dudt

    def _check(self, x, y, t, r, noise, drop, num_classes) -> int:
        if not torch.is_tensor(x) or x.dim() < 2:
            raise ValueError(f"x must be a (B, ...) tensor, got {tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        B = x.shape[0]
        if B == 0:
            raise ValueError("x is an empty batch (B = 0)")
        if not x.is_floating_point():
            raise ValueError(f"x must be floating point, got {x.dtype}")
        if not torch.is_tensor(y) or y.shape != (B,) or y.is_floating_point() or y.dtype == torch.bool:
            desc = f"{y.dtype} {tuple(y.shape)}" if torch.is_tensor(y) else type(y).__name__
            raise ValueError(f"y must be an integer tensor of shape ({B},), got {desc}")
        if y.device != x.device:
            raise ValueError(f"y is on {y.device} but x is on {x.device}")
        if (t is None) != (r is None):
            raise ValueError("pass t and r together (or neither)")
        if t is not None:
            for name, s in (("t", t), ("r", r)):
                check_row_draw(name, s, B)
        if noise is not None:
            check_noise(noise, x)
        if drop is not None:
            check_row_draw("drop", drop, B, boolean=True)
        if self.validate:  # data labels (no null label) and the given times, at one sync
            check_values(y, num_classes, *((None, None) if t is None else (r.to(y.device), t.to(y.device))),
                         null_label=False)
        return B


@contextmanager
def _null_label_hint(num_classes: int, drop: Optional[torch.Tensor] = None):
    """Re-raise an IndexError from a model call whose labels held the null label (always, or where
    ``drop`` has a True) as a ValueError naming the null label; ``drop`` is only read on that error."""
    try:
        yield
    except IndexError as err:
        if drop is not None and not bool(drop.any()):
            raise
        raise ValueError(
            f"the model raised IndexError on labels holding the null label {num_classes}: a model trained with "
            f"MeanFlowLoss must accept the label {num_classes} (the null label, used by class dropout and by "
            f"guidance's unconditional call), e.g. a label embedding of num_classes + 1 rows; or train "
            f"without it: class_dropout=0 and omega=1, kappa=0") from err

