"""Input checks shared by the models (MeanFlowDiT, IMFDiT), the losses and the samplers: the structural
checks of a model call (latents, labels, tangents, times as (B,) tensors, the dtype rule) and the value
checks (times, labels and guidance scales in range) with the switch that turns the latter off.

Structural checks read no tensor values and always run. Value checks do: on CUDA that is a host sync.
Callers that checked their own draws (MeanFlowLoss, IMFLoss, ``sample``, GraphSampler) run the model
inside ``skip_value_checks``, so a training or sampling step adds none; under torch.compile (a sync is a
graph break) and while a CUDA graph is being captured (no sync is allowed) they are off.
"""
import contextvars
from contextlib import contextmanager, nullcontext
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["time_dtype", "as_batch_times", "check_dtype", "check_latents", "check_labels", "check_tangent",
           "skip_value_checks", "value_checks_on", "check_values"]

Times = Union[float, torch.Tensor]
Interval = Tuple[str, torch.Tensor, str, torch.Tensor]      # (lo name, lo, hi name, hi): 0 ≤ lo ≤ hi ≤ 1
LowerBound = Tuple[str, torch.Tensor, float, str]           # (name, value, low, note): finite and ≥ low


# =================================================================================================
#                                     Structural checks
# =================================================================================================
def time_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype times and their embeddings' arguments are computed in, for data (or a model) of
    ``dtype``: float64 for float64 (exact references), float32 otherwise (never half precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_batch_times(name: str, value: Times, z: torch.Tensor) -> torch.Tensor:
    """Accept a float, a 0-d tensor or a (B,) tensor (B = z.shape[0]); return (B,) on z's device in
    ``time_dtype(z.dtype)``. A ValueError names ``name`` for any other shape or a non-float tensor."""
    batch = z.shape[0]
    if not torch.is_tensor(value):
        value = torch.tensor(float(value), dtype=torch.float64)  # rounded once, to the dtype below
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor or a float, got dtype {value.dtype}")
    if value.dim() == 0:
        value = value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"{name} must be a float, a 0-d tensor or shape ({batch},), got {tuple(value.shape)}")
    return value.to(device=z.device, dtype=time_dtype(z.dtype))


def check_dtype(name: str, x: torch.Tensor, dtype: torch.dtype) -> None:
    """``x`` (an input of a model whose parameters are ``dtype``) must be ``dtype``, or under
    torch.autocast on x's device also the autocast dtype (autocast casts it with the weights)."""
    if x.dtype == dtype:
        return
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.dtype == torch.get_autocast_dtype(dev):
        return
    raise ValueError(f"{name} has dtype {x.dtype} but the model's parameters are {dtype}: pass "
                     f"{name}.to({dtype}) or convert the model with model.to({x.dtype}) (torch.autocast "
                     f"does not change {name}'s dtype)")


def check_latents(z, chw: Tuple[int, int, int], dtype: torch.dtype) -> None:
    """z must be a non-empty (B, C, H, W) floating tensor with (C, H, W) = ``chw``, of the model's
    parameter dtype ``dtype`` (``check_dtype``)."""
    if not torch.is_tensor(z) or z.dim() != 4 or tuple(z.shape[1:]) != tuple(chw):
        shape = tuple(z.shape) if torch.is_tensor(z) else type(z).__name__
        raise ValueError(f"z must have shape (B, {', '.join(map(str, chw))}), got {shape}")
    if z.shape[0] == 0:
        raise ValueError("z is an empty batch (B = 0)")
    if not z.is_floating_point():
        raise ValueError(f"z must be a floating-point tensor, got dtype {z.dtype}")
    check_dtype("z", z, dtype)


def check_labels(y, z: torch.Tensor, num_classes: int) -> None:
    """y must be an int32/int64 tensor of shape (B,) on z's device (its values: ``check_values``)."""
    if not torch.is_tensor(y) or y.dtype not in (torch.int64, torch.int32) or y.shape != (z.shape[0],):
        desc = f"{y.dtype} {tuple(y.shape)}" if torch.is_tensor(y) else type(y).__name__
        raise ValueError(f"y must be an integer tensor of shape ({z.shape[0]},) with labels in "
                         f"[0, {num_classes}] ({num_classes} = null label), got {desc}")
    if y.device != z.device:
        raise ValueError(f"y is on {y.device} but z is on {z.device}")


def check_tangent(dz, z: torch.Tensor) -> None:
    """dz (forward_jvp's tangent of z) must be shaped like z, in its dtype and on its device."""
    if not torch.is_tensor(dz) or dz.shape != z.shape:
        raise ValueError(f"dz must be a tensor shaped like z {tuple(z.shape)}, got "
                         f"{tuple(dz.shape) if torch.is_tensor(dz) else type(dz).__name__}")
    if dz.dtype != z.dtype or dz.device != z.device:
        raise ValueError(f"dz must have z's dtype and device ({z.dtype} on {z.device}), got "
                         f"{dz.dtype} on {dz.device}: pass dz.to(z)")


def check_noise(noise, x: torch.Tensor) -> None:
    """A loss's explicit ``noise=`` must be shaped like x, in its dtype and on its device."""
    if not torch.is_tensor(noise) or noise.shape != x.shape:
        got = tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__
        raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {got}")
    if noise.dtype != x.dtype or noise.device != x.device:
        raise ValueError(f"noise must have the dtype and device of x ({x.dtype} on {x.device}), got "
                         f"{noise.dtype} on {noise.device}: pass noise.to(x)")


def check_row_draw(name: str, s, batch: int, *, boolean: bool = False) -> None:
    """A loss's explicit per-row draw (t, r, ω, …: float; ``drop``: bool with ``boolean``) must be (B,)."""
    kind_ok = torch.is_tensor(s) and (s.dtype == torch.bool if boolean else s.is_floating_point())
    if not kind_ok or s.shape != (batch,):
        desc = f"{s.dtype} {tuple(s.shape)}" if torch.is_tensor(s) else type(s).__name__
        raise ValueError(f"{name} must be a {'bool' if boolean else 'float'} tensor of shape ({batch},), got {desc}")


# =================================================================================================
#                                        Value checks
# =================================================================================================
_values_vouched_for = contextvars.ContextVar("meanflow_fast_values_vouched_for", default=False)


@contextmanager
def _vouching():
    token = _values_vouched_for.set(True)
    try:
        yield
    finally:
        _values_vouched_for.reset(token)


def skip_value_checks():
    """Context manager: model calls (MeanFlowDiT, IMFDiT) inside it skip their value checks (times,
    labels, guidance scales in range), the caller vouching for the values; the structural checks
    (shapes, dtypes, devices) still run. A no-op under torch.compile, where the value checks are off
    anyway."""
    return nullcontext() if torch.compiler.is_compiling() else _vouching()


def value_checks_on() -> bool:
    """Whether a model call here runs its value checks: not under torch.compile, not inside
    ``skip_value_checks``, not while a CUDA graph is being captured."""
    if torch.compiler.is_compiling() or _values_vouched_for.get():
        return False
    return not (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())


def _label_range(num_classes: int, null_label: bool) -> str:
    return (f"[0, {num_classes}] ({num_classes} = the null label, unconditional)" if null_label
            else f"[0, {num_classes})")


def _range_error(name: str, s: torch.Tensor, rule: str) -> Optional[str]:
    """The message for values ``s`` outside [0, 1] (NaN included), None if there are none."""
    outside = ~((s >= 0) & (s <= 1))
    if not bool(outside.any()):
        return None
    where = outside.nonzero().flatten()
    at = f"first at sample {int(where[0])}; outside at {where.numel()} of {s.numel()} samples"
    if bool(s.isnan().any()):
        return f"{name} must lie in [0, 1] ({rule}), got NaN ({at})"
    return (f"{name} must lie in [0, 1] ({rule}), got {name}.min() = {float(s.min()):.6g}, "
            f"{name}.max() = {float(s.max()):.6g} ({at})")


def _interval_error(lo_name: str, lo: torch.Tensor, hi_name: str, hi: torch.Tensor) -> Optional[str]:
    rule = f"0 ≤ {lo_name} ≤ {hi_name} ≤ 1"
    msg = _range_error(hi_name, hi, rule) or _range_error(lo_name, lo, rule)
    if msg is not None:
        return msg
    above = (lo > hi).nonzero().flatten()
    if above.numel() == 0:
        return None
    i = int(above[0])
    return (f"{lo_name} must be ≤ {hi_name} for every sample ({rule}), got {lo_name} = {float(lo[i]):.6g} > "
            f"{hi_name} = {float(hi[i]):.6g} at sample {i} ({lo_name} > {hi_name} at {above.numel()} of "
            f"{hi.numel()} samples)")


def _lower_bound_error(name: str, s: torch.Tensor, low: float, note: str) -> Optional[str]:
    bad = ~(torch.isfinite(s) & (s >= low))
    where = bad.nonzero().flatten()
    if where.numel() == 0:
        return None
    i = int(where[0])
    return (f"{name} must be finite and ≥ {low:g} ({note}), got {name} = {float(s[i]):.6g} at sample {i} "
            f"(out of range at {where.numel()} of {s.numel()} samples)")


def check_values(y: torch.Tensor, num_classes: int, r: Optional[torch.Tensor] = None,
                 t: Optional[torch.Tensor] = None, *, null_label: bool = True,
                 intervals: Sequence[Interval] = (), lower_bounds: Sequence[LowerBound] = ()) -> None:
    """Raise a ValueError unless the labels y lie in [0, num_classes] ([0, num_classes) with
    ``null_label=False``: data labels, before class dropout) and the (B,) tensors given satisfy:
    0 ≤ r ≤ t ≤ 1 (when r and t are given); 0 ≤ lo ≤ hi ≤ 1 for each ``(lo_name, lo, hi_name, hi)`` of
    ``intervals``; finite and ≥ low for each ``(name, value, low, note)`` of ``lower_bounds``. NaN fails
    every rule. All tensors on y's device. One flag for all of it: one host sync on CUDA; the message
    (the value and argument at fault, min/max or the first sample at fault) is worked out only on
    failure. Shared by the models, the losses and the samplers."""
    high = num_classes if null_label else num_classes - 1
    bad_y = ((y < 0) | (y > high)).any()
    pairs = ([("r", r, "t", t)] if t is not None else []) + list(intervals)
    bad = bad_y
    for _, lo, _, hi in pairs:
        bad = bad | ~((lo >= 0) & (lo <= hi) & (hi <= 1)).all()
    for _, s, low, _ in lower_bounds:
        bad = bad | ~(torch.isfinite(s) & (s >= low)).all()
    if not bool(bad):
        return
    if bool(bad_y):
        lo, hi = (int(v) for v in torch.aminmax(y))
        raise ValueError(f"y must hold labels in {_label_range(num_classes, null_label)}, got min {lo}, max {hi}")
    for pair in pairs:
        msg = _interval_error(*pair)
        if msg is not None:
            raise ValueError(msg)
    for bound in lower_bounds:
        msg = _lower_bound_error(*bound)
        if msg is not None:
            raise ValueError(msg)
