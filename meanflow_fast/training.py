"""A lean training step: loss, backward, a guard against non-finite values, optimizer, EMA.

The guard (``train_step``): a step whose loss or any gradient is not finite is skipped (no optimizer
update, no EMA update) and reported, so a NaN never reaches the weights, the EMA or a checkpoint.
"""
import copy
from contextlib import nullcontext
from typing import Dict, Optional

import torch
import torch.nn as nn

__all__ = ["EMA", "train_step", "autocast_for"]


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: Optional[float] = None):
        d = self.decay if decay is None else decay
        ema_p = list(self.model.parameters())
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, [p.to(e.dtype) for p, e in zip(src_p, ema_p)], 1.0 - d)
        for eb, b in zip(self.model.buffers(), model.buffers()):
            eb.copy_(b)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)


def autocast_for(device: torch.device, dtype: Optional[torch.dtype]):
    """bf16/fp16 autocast on CUDA (fp32 master weights); a no-op for dtype None or on CPU."""
    if dtype is None or torch.device(device).type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def train_step(model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
               ema: Optional[EMA] = None, generator: Optional[torch.Generator] = None,
               max_grad_norm: Optional[float] = None, autocast_dtype: Optional[torch.dtype] = None,
               ) -> Dict[str, float]:
    """One optimisation step. Returns the loss stats (floats) plus ``skipped`` (1.0 if the loss or a
    gradient was not finite and nothing was updated) and ``grad_norm``."""
    optimizer.zero_grad(set_to_none=True)
    with autocast_for(x.device, autocast_dtype):
        loss, stats = loss_fn(model, x, y, generator=generator)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else loss.new_zeros(())
    finite = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))  # one sync per step
    out = {k: float(v) for k, v in stats.items()}
    out["grad_norm"] = float(grad_norm)
    out["skipped"] = 0.0 if finite else 1.0
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        return out
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if ema is not None:
        ema.update(model)
    return out
