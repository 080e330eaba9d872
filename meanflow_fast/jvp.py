"""Directional derivatives by finite differences: the JVP for models that forward-mode AD cannot run
(FSDP, fused attention kernels without a forward-AD rule). docs/DESIGN.md, "9 Improved MeanFlow (iMF):
the objective".

    D = c₀·f(p) + c₁·f(p + a·d) + c₂·f(p + b·d)      (the derivative at 0 of the quadratic through
    c₁ = b / (a(b − a)),  c₂ = −a / (b(b − a)),       the three nodes 0, a, b along the direction d)
    c₀ = −(c₁ + c₂)

Central nodes (a, b) = (−ε, ε) give c₀ = 0, D = (f(p + εd) − f(p − εd)) / 2ε; near the end of a valid
range the one-sided nodes (ε, 2ε) or (−ε, −2ε) give the second-order (−3f₀ + 4f(±ε) − f(±2ε)) / ±2ε.
"""
import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

__all__ = ["central_difference_jvp", "default_step"]

Bound = Union[float, torch.Tensor]


def default_step(dtype: torch.dtype) -> float:
    """The step ε = (3u)^(1/3) that balances the central difference's truncation ε²/6·M₃ against its
    rounding u·|f|/ε for a unit-scale f (M₃ ≈ |f|), u = finfo(dtype).eps / 2 the unit roundoff:
    5.6e-3 for float32 (error ≈ 1.6e-5·|f|), 6.9e-6 for float64 (≈ 2.4e-11·|f|); 0.11 for float16,
    0.23 for bfloat16, where the derivative keeps only about two digits."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return (3.0 * torch.finfo(dtype).eps / 2) ** (1.0 / 3.0)


@torch.no_grad()
def central_difference_jvp(fn: Callable[..., torch.Tensor], primals: Sequence, tangents: Sequence,
                           eps: Optional[float] = None, *, step_range: Optional[Tuple[Bound, Bound]] = None,
                           f0: Optional[torch.Tensor] = None, stacked: bool = False) -> torch.Tensor:
    """The derivative of ``fn(*primals)`` along ``tangents`` by a finite difference, without autograd.

    Args:
        fn: returns one tensor. With ``step_range`` or ``stacked`` it must be row-wise: row i of the
            output depends on row i of the primals only (dim 0 is the batch B).
        primals: the point p (tensors; an entry whose tangent is None may be anything and is passed
            unchanged: labels, flags).
        tangents: the direction d, one per primal: a tensor shaped like its primal, or None for a primal
            held fixed.
        eps: the step along d (absolute: p and d are taken to be of unit scale). Default
            ``default_step`` of the least precise dtype among the moved primals; a half-precision model
            fed float32 inputs should pass its own dtype's step.
        step_range: (lo, hi), floats or (B,) tensors with lo ≤ 0 ≤ hi (±inf allowed): row i is valid for
            p + s·d with s in [lo_i, hi_i], e.g. times that must stay in [0, 1]. Each row then takes
            central nodes (−ε, ε) if the range allows, else (ε, 2ε), else (−ε, −2ε), else, with less
            than 2ε on both sides, (w/2, w) on the wider side w; a row with no room (lo = hi = 0) gets 0.
            Every evaluated point lies in the range.
        f0: ``fn(*primals)`` if already at hand (used by the one-sided rows; computed when
            ``step_range`` is given and f0 is not).
        stacked: evaluate both shifted points in one call of 2B rows (tensor primals concatenated along
            dim 0; every tensor primal must then have B rows).

    Returns the derivative (no autograd graph) in fn's output dtype, combined in at least float32.

    Error bound, for each output element (f three times differentiable along d):

        |D − ∂f/∂d| ≤ |a·b|/6 · M₃ + (|c₀| + |c₁| + |c₂|) · δ

    M₃ = max |d³/ds³ f(p + s·d)| over the nodes' span, δ the absolute error of one evaluation of f at a
    shifted point (rounding inside f and in forming p + s·d; about u·|f| for a well-conditioned f). For
    central rows that is ε²/6·M₃ + δ/ε, for one-sided rows ε²/3·M₃ + 4δ/ε; (w/2, w) rows have
    w²/12·M₃ + 8δ/|w|. With δ ≈ u·|f| and M₃ ≈ |f|, the default ε minimises the central bound.
    """
    primals, tangents = tuple(primals), tuple(tangents)
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    if len(primals) != len(tangents):
        raise ValueError(f"primals and tangents must have the same length, got {len(primals)} and {len(tangents)}")
    moved = [i for i, d in enumerate(tangents) if d is not None]
    if not moved:
        raise ValueError("tangents: at least one entry must be a tensor (None holds a primal fixed)")
    for i in moved:
        p, d = primals[i], tangents[i]
        if not torch.is_tensor(p) or not p.is_floating_point():
            raise ValueError(f"primals[{i}] has a tangent, so it must be a floating-point tensor, got "
                             f"{p.dtype if torch.is_tensor(p) else type(p).__name__}")
        if not torch.is_tensor(d) or d.shape != p.shape or d.dtype != p.dtype or d.device != p.device:
            got = f"{d.dtype} {tuple(d.shape)} on {d.device}" if torch.is_tensor(d) else type(d).__name__
            raise ValueError(f"tangents[{i}] must be a tensor shaped like primals[{i}] ({p.dtype} {tuple(p.shape)} "
                             f"on {p.device}) or None, got {got}")
    if eps is None:
        eps = max(default_step(primals[i].dtype) for i in moved)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
    eps = float(eps)
    per_row = step_range is not None or stacked
    B = None
    if per_row:
        rows = [p for p in primals if torch.is_tensor(p)] if stacked else [primals[i] for i in moved]
        B = rows[0].shape[0] if rows[0].dim() > 0 else None
        if B is None or any(p.dim() == 0 or p.shape[0] != B for p in rows):
            raise ValueError(f"with step_range or stacked, every {'tensor' if stacked else 'moved'} primal must "
                             f"have the batch B as dim 0, got shapes {[tuple(p.shape) for p in rows]}")
    dev = primals[moved[0]].device

    if step_range is None:
        a = torch.full((1,), -eps, dtype=torch.float64, device=dev)
        b, c0, c1, c2 = -a, None, torch.full_like(a, -0.5 / eps), torch.full_like(a, 0.5 / eps)
    else:
        a, b, c0, c1, c2 = _stencil(*_as_range(step_range, B, dev), eps)
        if f0 is None:
            f0 = fn(*primals)

    def shifted(s):
        out = []
        for p, d in zip(primals, tangents):
            if d is None:
                out.append(p)
            else:
                out.append(p + _rows(s, p).to(p.dtype) * d)
        return out

    pa, pb = shifted(a), shifted(b)
    if stacked:
        both = fn(*[torch.cat([x, y]) if torch.is_tensor(x) else x for x, y in zip(pa, pb)])
        if not torch.is_tensor(both) or both.dim() == 0 or both.shape[0] != 2 * B:
            raise ValueError(f"fn must return a tensor with 2B = {2 * B} rows for stacked primals, got "
                             f"{tuple(both.shape) if torch.is_tensor(both) else type(both).__name__}")
        fa, fb = both[:B], both[B:]
    else:
        fa, fb = fn(*pa), fn(*pb)
    if not torch.is_tensor(fa) or not torch.is_tensor(fb):
        raise ValueError(f"fn must return a tensor, got {type(fa).__name__}")
    if f0 is not None and (not torch.is_tensor(f0) or f0.shape != fa.shape):
        raise ValueError(f"f0 must be fn(*primals), shaped {tuple(fa.shape)}, got "
                         f"{tuple(f0.shape) if torch.is_tensor(f0) else type(f0).__name__}")
    acc = torch.promote_types(fa.dtype, torch.float32)
    if c0 is None:  # central everywhere: c₁ = −c₂
        deriv = (fb.to(acc) - fa.to(acc)) * _rows(c2, fa).to(acc)
    else:  # c₀ = −(c₁ + c₂): differences from f₀ keep the sum exact for central rows too
        f0 = f0.detach().to(acc)
        deriv = (fa.to(acc) - f0) * _rows(c1, fa).to(acc) + (fb.to(acc) - f0) * _rows(c2, fa).to(acc)
    return deriv.to(fa.dtype)


def _rows(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) or (1,) step or coefficient, shaped to broadcast against ``like`` row by row."""
    return s.view((-1,) + (1,) * max(like.dim() - 1, 0)) if like.dim() > 0 else s.view(())


def _as_range(step_range, B: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(step_range, (tuple, list)) or len(step_range) != 2:
        raise ValueError(f"step_range must be a pair (lo, hi), got {step_range!r}")
    out = []
    for name, v in zip(("lo", "hi"), step_range):
        if torch.is_tensor(v):
            if v.shape not in ((), (B,)) or not v.is_floating_point():
                raise ValueError(f"step_range {name} must be a float or a float tensor of shape ({B},), got "
                                 f"{v.dtype} {tuple(v.shape)}")
            v = v.to(device=device, dtype=torch.float64).expand(B)
        elif isinstance(v, (int, float)):
            v = torch.full((B,), float(v), dtype=torch.float64, device=device)
        else:
            raise ValueError(f"step_range {name} must be a float or a (B,) tensor, got {type(v).__name__}")
        out.append(v)
    lo, hi = out
    if not bool(((lo <= 0) & (hi >= 0)).all()):
        raise ValueError("step_range must satisfy lo ≤ 0 ≤ hi in every row (the point itself must be valid)")
    return lo, hi


def _stencil(lo: torch.Tensor, hi: torch.Tensor, eps: float):
    """Per-row nodes (a, b) and coefficients (c₀, c₁, c₂) of the three-point derivative, all in float64."""
    central = (lo <= -eps) & (hi >= eps)
    fwd = ~central & (hi >= 2 * eps)
    bwd = ~central & ~fwd & (lo <= -2 * eps)
    wide = torch.where(hi >= -lo, hi, lo)  # the wider side, signed, for rows with < 2ε on both sides
    a = torch.where(central, -eps, torch.where(fwd, eps, torch.where(bwd, -eps, wide / 2)))
    b = torch.where(central, eps, torch.where(fwd, 2 * eps, torch.where(bwd, -2 * eps, wide)))
    none = b == 0  # no room: the point is evaluated unshifted and weighted 0
    a_s, b_s = torch.where(none, 1.0, a), torch.where(none, 2.0, b)
    c1 = torch.where(none, 0.0, b_s / (a_s * (b_s - a_s)))
    c2 = torch.where(none, 0.0, -a_s / (b_s * (b_s - a_s)))
    return a, b, -(c1 + c2), c1, c2
