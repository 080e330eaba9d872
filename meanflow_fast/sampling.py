"""Samplers: 1-NFE, 2-NFE and n-step MeanFlow sampling (docs/DESIGN.md, "1 The MeanFlow objective").

    1-NFE:   x = ε − u_θ(ε, r = 0, t = 1 | y)
    n steps: z_r = z_t − (t − r)·u_θ(z_t, r, t | y)   on times 1 = t_0 > t_1 > … > t_n = 0

Guidance is folded into training (MeanFlowLoss's ω, κ), so sampling is plain conditional.
"""
from contextlib import nullcontext
from typing import Optional, Sequence, Tuple

import torch

from .model import check_values, skip_value_checks, time_dtype

__all__ = ["sample", "sample_times", "time_grid", "initial_noise"]


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
           times: Optional[Sequence[float]] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Class-conditional samples x (B, C, H, W) from ``model(z, r, t, y)``.

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
    """
    grid = time_grid(steps, times)
    noise = initial_noise(model, y, noise, generator=generator, shape=shape, dtype=dtype)
    z = noise
    # The grid is checked and, for a model with num_classes, the labels too (initial_noise).
    vouch = skip_value_checks if getattr(model, "num_classes", None) is not None else nullcontext
    with vouch():
        for t, r in zip(grid, grid[1:]):
            r_b, t_b = (torch.full((z.shape[0],), s, dtype=time_dtype(z.dtype), device=z.device) for s in (r, t))
            z = z - (t - r) * model(z, r_b, t_b, y)
    return z
