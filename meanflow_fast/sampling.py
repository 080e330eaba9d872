"""Samplers: 1-NFE, 2-NFE and n-step MeanFlow sampling (docs/DESIGN.md, "1 The MeanFlow objective").

    1-NFE:   x = ε − u_θ(ε, r = 0, t = 1 | y)
    n steps: z_r = z_t − (t − r)·u_θ(z_t, r, t | y)   on times 1 = t_0 > t_1 > … > t_n = 0

For a MeanFlowDiT guidance is folded into training (MeanFlowLoss's ω, κ), so sampling is plain
conditional. An IMFDiT (docs/DESIGN.md, "9 Improved MeanFlow (iMF): the objective") takes the guidance
scale ω and its interval [t_min, t_max] as inputs: the same update with u_θ(z_t, t, h = t − r, ω, t_min,
t_max | y) from the u-head alone, one network call per step (no doubled batch).
"""
import math
from contextlib import nullcontext
from typing import Optional, Sequence, Tuple, Union

import torch

from .imf.model import IMF_PRESETS, IMFConfig, IMFDiT
from .model import check_values, skip_value_checks, time_dtype

__all__ = ["sample", "sample_times", "time_grid", "initial_noise", "IMF_GUIDANCE", "imf_guidance"]

Setting = Union[float, torch.Tensor]

# iMF sampling settings (ω, t_min, t_max) per architecture size, by number of steps. The paper's models:
# the official evaluation settings of the released checkpoints (1-NFE; XL/2 also 2-NFE). A step count
# without its own entry uses the nearest smaller one (B/2 at 2 steps: its 1-NFE setting). The small
# presets sample without guidance (ω = 1; the interval then changes nothing): they are trained on toy
# data, where no tuned setting exists to carry over (the demo chooses its own, see meanflow_fast/demo.py).
IMF_GUIDANCE = {
    "B/2": {1: (8.0, 0.4, 0.65)},
    "M/2": {1: (10.5, 0.4, 0.6)},
    "L/2": {1: (10.5, 0.4, 0.6)},
    "XL/2": {1: (8.0, 0.42, 0.62), 2: (4.0, 0.36, 0.64)},
    "tiny": {1: (1.0, 0.0, 1.0)},
    "digits": {1: (1.0, 0.0, 1.0)},
}
# The fields that name an architecture size: a model built from a preset, or an official checkpoint
# loaded by load_official_imf (any input_size, classes, v-head or not), is found by these.
_SIZE_FIELDS = ("depth", "head_depth", "hidden_size", "num_heads", "patch_size")


def sample_times(steps: int) -> Tuple[float, ...]:
    """Uniform time grid 1 = t_0 > … > t_steps = 0."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int ≥ 1, got {steps!r}")
    return tuple(1.0 - i / steps for i in range(steps + 1))


def time_grid(steps: int = 1, times: Optional[Sequence[float]] = None) -> Tuple[float, ...]:
    """``times`` (checked: strictly decreasing within [0, 1]) or the uniform grid of ``steps`` steps."""
    grid = tuple(float(s) for s in times) if times is not None else sample_times(steps)
    if len(grid) < 2 or any(a <= b for a, b in zip(grid, grid[1:])) or not 0 <= grid[-1] < grid[0] <= 1:
        raise ValueError(f"times must decrease strictly within [0, 1], got {grid}")
    return grid


def _imf_size(config: IMFConfig) -> Optional[str]:
    """The IMF_PRESETS name whose architecture size ``config`` has, None if it has none of them."""
    for name, fields in IMF_PRESETS.items():
        preset = IMFConfig(**fields)
        if all(getattr(config, f) == getattr(preset, f) for f in _SIZE_FIELDS):
            return name
    return None


def imf_guidance(config: IMFConfig, steps: int) -> Optional[Tuple[float, float, float]]:
    """The default (ω, t_min, t_max) for ``steps`` sampling steps of an iMF model of this config
    (``IMF_GUIDANCE``), None for an architecture size without an entry."""
    table = IMF_GUIDANCE.get(_imf_size(config))
    if table is None:
        return None
    return table[max(k for k in table if k <= steps)]


def is_imf(model) -> bool:
    """An IMFDiT (also inside torch.compile's wrapper): sampled with ω and a guidance interval."""
    return isinstance(getattr(model, "_orig_mod", model), IMFDiT)


def _imf_float(name: str, value) -> float:
    if torch.is_tensor(value) and value.dim() == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def imf_settings(model, steps: int, omega: Optional[Setting], t_min: Optional[Setting],
                 t_max: Optional[Setting], *, tensors: bool = True):
    """The checked (ω, t_min, t_max) of an iMF sampler: each given value, else the model's default
    (``imf_guidance``). Floats are checked here; (B,) tensors are returned as given and checked by
    ``_imf_batch_settings`` once the batch is known. With ``tensors=False`` only floats (or 0-d tensors)
    are accepted."""
    given = {"omega": omega, "t_min": t_min, "t_max": t_max}
    missing = [k for k, v in given.items() if v is None]
    if missing:
        config = getattr(getattr(model, "_orig_mod", model), "config")
        default = imf_guidance(config, steps)
        if default is None:
            raise ValueError(f"{', '.join(missing)}: this iMF architecture (depth {config.depth}, head depth "
                             f"{config.head_depth}, width {config.hidden_size}, {config.num_heads} heads, patch "
                             f"{config.patch_size}) has no default sampling setting; pass omega, t_min and t_max "
                             f"(defaults exist for the sizes {sorted(IMF_GUIDANCE)})")
        given.update({k: v for k, v in zip(given, default) if given[k] is None})
    out = {}
    for k, v in given.items():
        if torch.is_tensor(v) and v.dim() != 0:
            if not tensors:
                raise ValueError(f"{k} must be a float (or a 0-d tensor) here, got a tensor of shape {tuple(v.shape)}")
            if not v.is_floating_point() or v.dim() != 1:
                raise ValueError(f"{k} must be a float or a (B,) floating-point tensor, got {v.dtype} "
                                 f"{tuple(v.shape)}")
            out[k] = v
        else:
            out[k] = _imf_float(k, v)
    omega, t_min, t_max = out.values()
    if not torch.is_tensor(omega) and not (math.isfinite(omega) and omega >= 1):
        raise ValueError(f"omega (the guidance scale) must be finite and ≥ 1 (1 = no guidance), got {omega}")
    lo = t_min if not torch.is_tensor(t_min) else 0.0
    hi = t_max if not torch.is_tensor(t_max) else 1.0
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"the guidance interval must satisfy 0 ≤ t_min ≤ t_max ≤ 1, got t_min = {t_min}, "
                         f"t_max = {t_max}")
    return out["omega"], out["t_min"], out["t_max"]


def _imf_batch_settings(omega: Setting, t_min: Setting, t_max: Setting, z: torch.Tensor):
    """(B,) tensors of ω, t_min, t_max on z's device in z's time dtype; any tensor given is checked
    here (its shape, and with the floats, its values at one host read)."""
    B, dtype = z.shape[0], time_dtype(z.dtype)
    out, tensor_given = [], False
    for name, v in (("omega", omega), ("t_min", t_min), ("t_max", t_max)):
        if torch.is_tensor(v):
            tensor_given = True
            if v.shape != (B,) or v.device != z.device:
                raise ValueError(f"{name} must be a float or a tensor of shape (B={B},) on {z.device}, got "
                                 f"{tuple(v.shape)} on {v.device}")
            out.append(v.to(dtype))
        else:
            out.append(torch.full((B,), v, dtype=dtype, device=z.device))
    omega, t_min, t_max = out
    if tensor_given:
        bad = torch.stack([~(torch.isfinite(omega) & (omega >= 1)).all(),
                           ~((t_min >= 0) & (t_min <= t_max) & (t_max <= 1)).all()]).tolist()
        if bad[0]:
            raise ValueError("omega (the guidance scale) must be finite and ≥ 1 (1 = no guidance) for every "
                             f"sample, got values in [{float(omega.min())}, {float(omega.max())}]")
        if bad[1]:
            raise ValueError("the guidance interval must satisfy 0 ≤ t_min ≤ t_max ≤ 1 for every sample")
    return omega, t_min, t_max


def initial_noise(model, y: torch.Tensor, noise: Optional[torch.Tensor] = None, *,
                  generator: Optional[torch.Generator] = None, shape: Optional[Sequence[int]] = None,
                  dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Check the labels y (B,), their range too when the model has ``num_classes`` (as MeanFlowLoss reads
    it), and return the starting noise (B, *shape) on y's device: ``noise`` as given (checked), else drawn
    from ``generator`` with ``shape`` (default: (C, H, W) from ``model.config``) and ``dtype`` (default:
    the model's parameter dtype)."""
    if (not torch.is_tensor(y) or y.dim() != 1 or y.numel() == 0 or y.is_floating_point()
            or y.dtype == torch.bool):
        raise ValueError(f"y must be a non-empty 1-D integer tensor of labels, got "
                         f"{(y.dtype, tuple(y.shape)) if torch.is_tensor(y) else type(y).__name__}")
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None:
        # One device sync per call: a label outside the embedding table would otherwise be a device-side
        # assert on CUDA, which leaves the process unable to run anything more on the GPU.
        check_values(y, num_classes)
    B, device = y.shape[0], y.device
    if noise is not None:
        if not torch.is_tensor(noise) or noise.shape[0] != B or noise.device != device:
            raise ValueError(f"noise must be (B={B}, ...) on {device} (len(y), y's device), got "
                             f"{tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__}"
                             f"{' on ' + str(noise.device) if torch.is_tensor(noise) else ''}")
        return noise
    if shape is None:
        cfg = getattr(model, "config", None)
        if cfg is None:
            raise ValueError("shape is required for a model without a .config (C, H, W)")
        shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if dtype is None:
        dtype = next(model.parameters()).dtype if hasattr(model, "parameters") else torch.float32
    gdev = generator.device if generator is not None else device
    return torch.randn((B, *shape), generator=generator, device=gdev, dtype=dtype).to(device)


@torch.no_grad()
def sample(model, y: torch.Tensor, *, steps: int = 1, noise: Optional[torch.Tensor] = None,
           generator: Optional[torch.Generator] = None, shape: Optional[Sequence[int]] = None,
           times: Optional[Sequence[float]] = None, dtype: Optional[torch.dtype] = None,
           omega: Optional[Setting] = None, t_min: Optional[Setting] = None,
           t_max: Optional[Setting] = None) -> torch.Tensor:
    """Class-conditional samples x (B, C, H, W) from ``model(z, r, t, y)``, or from an IMFDiT's u-head.

    y: (B,) int labels in [0, num_classes] (num_classes, the null label, gives unconditional samples;
    the range is checked, one device sync). The starting noise is ``noise`` if given, else drawn from
    ``generator`` (seeded: same generator state → same samples) with ``shape`` (default: the model's
    (C, H, W) from ``model.config``). ``times`` overrides the uniform grid of ``steps`` steps; it must
    decrease from 1 to 0.

    The model is called as ``model(z, r, t, y)`` with r and t (B,) tensors on z's device, in
    ``meanflow_fast.model.time_dtype(z.dtype)`` (float32, float64 for float64 z), as MeanFlowLoss passes
    them: a MeanFlowDiT turns float times into exactly these tensors. For a model with ``num_classes``
    the calls run inside ``meanflow_fast.model.skip_value_checks`` (the grid and the labels are checked
    here: no device sync per step).

    An IMFDiT is called as ``model(z, t, t − r, omega, t_min, t_max, y, heads="u")`` (the trunk and the
    u-head only). ``omega`` (finite, ≥ 1; 1 = no guidance) and the guidance interval ``t_min``, ``t_max``
    (0 ≤ t_min ≤ t_max ≤ 1) are floats or (B,) tensors; any not given is the model's default for its
    architecture size and the number of steps (``IMF_GUIDANCE``: the official settings of the released
    B/2, M/2, L/2, XL/2 checkpoints; ω = 1 for the small presets). They are only for an IMFDiT.
    """
    grid = time_grid(steps, times)
    imf = is_imf(model)
    if not imf and any(v is not None for v in (omega, t_min, t_max)):
        raise ValueError("omega, t_min and t_max are sampling inputs of an iMF model (IMFDiT) only; a MeanFlow "
                         "model's guidance is folded into training (MeanFlowLoss's omega, kappa)")
    if imf:
        omega, t_min, t_max = imf_settings(model, len(grid) - 1, omega, t_min, t_max)
    noise = initial_noise(model, y, noise, generator=generator, shape=shape, dtype=dtype)
    z = noise
    if imf:
        settings = _imf_batch_settings(omega, t_min, t_max, z)
    # The grid is checked and, for a model with num_classes, the labels too (initial_noise).
    vouch = skip_value_checks if getattr(model, "num_classes", None) is not None else nullcontext
    with vouch():
        for t, r in zip(grid, grid[1:]):
            if imf:
                t_b, h_b = (torch.full((z.shape[0],), s, dtype=time_dtype(z.dtype), device=z.device)
                            for s in (t, t - r))
                z = z - (t - r) * model(z, t_b, h_b, *settings, y, heads="u")
            else:
                r_b, t_b = (torch.full((z.shape[0],), s, dtype=time_dtype(z.dtype), device=z.device)
                            for s in (r, t))
                z = z - (t - r) * model(z, r_b, t_b, y)
    return z
