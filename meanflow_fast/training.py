"""A lean training step: loss, backward, a guard against non-finite values, optimizer, EMA.

The guard (``train_step``): a step whose loss or any gradient is not finite is skipped (no optimizer
update, no EMA update) and reported, so a NaN never reaches the weights, the EMA or a checkpoint. Under
``torch.distributed`` the decision is all-reduced, so every rank skips the same steps.
``BadStepCounter`` turns a run of skipped steps into a clear stop.

DDP: ``MeanFlowObjective`` holds the model and the loss in one module whose ``forward`` runs the whole
loss (guidance evaluations and ``forward_jvp`` included). Wrap *that* in DistributedDataParallel: DDP's
forward then prepares the reducer for the one graph the loss builds, and its backward hooks all-reduce
every parameter's gradient. (Calling ``ddp.module.forward_jvp`` directly would bypass DDP's forward and
leave the gradients unsynchronised.)

    objective = DDP(MeanFlowObjective(model, MeanFlowLoss(...)))
    stats = train_step(objective, None, optimizer, x, y, ema=ema, generator=g)
"""
import copy
from contextlib import nullcontext
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["EMA", "train_step", "autocast_for", "MeanFlowObjective", "unwrap_model", "BadStepCounter",
           "NonFiniteTrainingError"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare network inside DDP and/or ``MeanFlowObjective`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, MeanFlowObjective):
            model = model.model
        else:
            return model


class MeanFlowObjective(nn.Module):
    """``forward(x, y, generator=None) -> (loss, stats)``: model and loss in one module, for DDP."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable (e.g. MeanFlowLoss), got {type(loss_fn).__name__}")
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: Optional[torch.Generator] = None):
        return self.loss_fn(self.model, x, y, generator=generator)


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: Optional[float] = None):
        d = self.decay if decay is None else decay
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {d}")
        model = unwrap_model(model)
        ema_p = list(self.model.parameters())
        src_p = [p.detach() for p in model.parameters()]
        if len(ema_p) != len(src_p) or any(a.shape != b.shape for a, b in zip(ema_p, src_p)):
            raise ValueError("model does not match the EMA's model (different parameter count or shapes)")
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


def _all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """AND of ``flag`` over the ranks of the default process group (``flag`` alone without one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def train_step(model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
               ema: Optional[EMA] = None, generator: Optional[torch.Generator] = None,
               max_grad_norm: Optional[float] = None, autocast_dtype: Optional[torch.dtype] = None,
               ) -> Dict[str, float]:
    """One optimisation step. Returns the loss stats (floats) plus ``skipped`` (1.0 if the loss or a
    gradient was not finite and nothing was updated) and ``grad_norm``.

    ``loss_fn(model, x, y, generator=...)`` computes ``(loss, stats)``; with ``loss_fn=None``, ``model``
    itself does (a ``MeanFlowObjective``, possibly DDP-wrapped). The EMA follows the bare network.
    """
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
    optimizer.zero_grad(set_to_none=True)
    with autocast_for(x.device, autocast_dtype):
        loss, stats = model(x, y, generator=generator) if loss_fn is None else loss_fn(model, x, y, generator=generator)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else loss.new_zeros(())
    finite = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))  # one sync per step
    finite = _all_ranks_agree(finite, x.device)
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


class NonFiniteTrainingError(RuntimeError):
    """Raised by ``BadStepCounter`` after too many consecutive non-finite steps."""


class BadStepCounter:
    """Counts skipped (non-finite) steps; ``observe`` raises after ``limit`` in a row."""

    def __init__(self, limit: int = 20):
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit (consecutive non-finite steps before stopping) must be an int ≥ 1, got {limit!r}")
        self.limit, self.consecutive, self.total = limit, 0, 0

    def observe(self, skipped: bool, step: int = -1) -> None:
        if not skipped:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.limit:
            raise NonFiniteTrainingError(
                f"stopping: {self.consecutive} consecutive steps had a non-finite loss or gradient "
                f"(last at step {step}; {self.total} skipped in total). Nothing non-finite was applied to "
                f"the weights, the EMA or a checkpoint; resume from the last checkpoint with a lower "
                f"learning rate or check the data (limit set by --max-bad-steps {self.limit}).")
