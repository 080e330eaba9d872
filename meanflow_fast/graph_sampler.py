"""A CUDA-graph-captured 1-NFE (or n-step) sampler.

One network call per step leaves the GPU idle between kernel launches at small batches (batch-1
latency is launch-bound). Capturing the whole sampler in a CUDA graph replays every launch at once:

    static buffers (noise, labels, per-step times) → warm-up on a side stream (Triton autotuning and
    cuBLAS workspaces happen here, outside the capture) → capture → per call: ``copy_`` the inputs
    into the static buffers, ``replay()``, return (a clone of) the static output.

One graph per (batch, dtype, device). On a CPU (or with ``use_graph=False``) the sampler runs eagerly
with the same arithmetic, so code written against it runs anywhere.

An IMFDiT is captured the same way, its u-head only (``heads="u"``). Its guidance scale ω and interval
[t_min, t_max] are fixed when the sampler is built, as the time grid is: they are filled into static (B,)
buffers at capture and never change between replays (a new setting is a new GraphSampler).
"""
from contextlib import nullcontext
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from .model import skip_value_checks, time_dtype
from .sampling import imf_settings, initial_noise, is_imf, time_grid

__all__ = ["GraphSampler"]


class GraphSampler:
    """``x = GraphSampler(model, steps=1)(y, noise)``: samples (B, C, H, W) from labels y (B,), checked
    as ``sample`` checks them (range included: one device sync per call, before the replay). The model
    runs inside ``meanflow_fast.model.skip_value_checks`` (a capture allows no sync; the grid and the
    labels are checked here), so the labels of a model without ``num_classes`` go unchecked.

    Args:
        model: ``u(z, r, t, y)`` (a MeanFlowDiT, typically the EMA copy) or an IMFDiT, in eval mode.
        steps / times: the time grid (as ``meanflow_fast.sample``).
        decode: optional ``x → image`` (e.g. a VAE decoder) applied after sampling.
        decode_in_graph: capture ``decode`` inside the graph too (it must be capturable).
        autocast_dtype: run the network under CUDA autocast with this dtype (e.g. torch.bfloat16).
        warmup: eager warm-up iterations before capture (≥ 1; Triton autotuning runs here).
        use_graph: False forces eager execution (also the behaviour on non-CUDA devices).
        omega, t_min, t_max: an IMFDiT's guidance scale and interval, floats (as ``meanflow_fast.sample``,
            whose per-architecture defaults fill any not given); only for an IMFDiT.
    """

    def __init__(self, model: Callable, *, steps: int = 1, times: Optional[Sequence[float]] = None,
                 decode: Optional[Callable] = None, decode_in_graph: bool = False,
                 autocast_dtype: Optional[torch.dtype] = None, warmup: int = 2, use_graph: bool = True,
                 omega: Optional[float] = None, t_min: Optional[float] = None, t_max: Optional[float] = None):
        grid = time_grid(steps, times)
        if warmup < 1:
            raise ValueError(f"warmup must be ≥ 1 (autotuning must not run inside a capture), got {warmup}")
        self.imf = is_imf(model)
        if not self.imf and any(v is not None for v in (omega, t_min, t_max)):
            raise ValueError("omega, t_min and t_max are sampling inputs of an iMF model (IMFDiT) only; a "
                             "MeanFlow model's guidance is folded into training (MeanFlowLoss's omega, kappa)")
        # (ω, t_min, t_max) as checked floats, fixed for the sampler's life (static buffers in a graph).
        self.settings = (imf_settings(model, len(grid) - 1, omega, t_min, t_max, tensors=False)
                         if self.imf else None)
        self.model, self.grid, self.decode = model, grid, decode
        self.decode_in_graph, self.autocast_dtype = decode_in_graph, autocast_dtype
        self.warmup, self.use_graph = warmup, use_graph
        self._graphs: Dict[Tuple, dict] = {}

    # ---------------------------------------------------------------------------------------------
    def _run(self, z: torch.Tensor, y: torch.Tensor, times: Sequence[Tuple[torch.Tensor, ...]]):
        """The sampler's arithmetic; ``times`` holds the model's (B,) time inputs per step: (t, r), or for
        an IMFDiT (t, h, ω, t_min, t_max)."""
        ctx = (torch.autocast("cuda", dtype=self.autocast_dtype)
               if self.autocast_dtype is not None and z.device.type == "cuda" else nullcontext())
        with torch.no_grad(), ctx, skip_value_checks():
            for step, (tf, rf) in zip(times, zip(self.grid, self.grid[1:])):
                u = (self.model(z, *step, y, heads="u") if self.imf else
                     self.model(z, step[1], step[0], y))
                z = z - (tf - rf) * u.to(z.dtype)
            if self.decode is not None and self.decode_in_graph:
                z = self.decode(z)
        return z

    def _time_buffers(self, B: int, noise: torch.Tensor):
        """The per-step time inputs as (B,) tensors, in the precision the model turns times into (float64
        for float64 noise, else float32): the tensors ``sample`` passes. (t, r) per step; for an IMFDiT
        (t, h = t − r, ω, t_min, t_max), the last three shared by every step."""
        dtype = time_dtype(noise.dtype)

        def full(s: float) -> torch.Tensor:
            return torch.full((B,), s, device=noise.device, dtype=dtype)
        steps = list(zip(self.grid, self.grid[1:]))
        if self.imf:
            settings = tuple(full(s) for s in self.settings)
            return [(full(t), full(t - r), *settings) for t, r in steps]
        return [(full(t), full(r)) for t, r in steps]

    def _capture(self, noise: torch.Tensor, y: torch.Tensor) -> dict:
        static = {"noise": noise.clone(), "y": y.clone(), "times": self._time_buffers(len(y), noise)}
        side = torch.cuda.Stream(device=noise.device)
        side.wait_stream(torch.cuda.current_stream(noise.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._run(static["noise"], static["y"], static["times"])
        torch.cuda.current_stream(noise.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static["out"] = self._run(static["noise"], static["y"], static["times"])
        static["graph"] = graph
        return static

    # ---------------------------------------------------------------------------------------------
    def __call__(self, y: torch.Tensor, noise: Optional[torch.Tensor] = None, *,
                 generator: Optional[torch.Generator] = None, shape: Optional[Sequence[int]] = None,
                 dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        noise = initial_noise(self.model, y, noise, generator=generator, shape=shape, dtype=dtype)
        B, device = y.shape[0], y.device
        if not (self.use_graph and device.type == "cuda"):
            out = self._run(noise, y, self._time_buffers(B, noise))
        else:
            key = (B, noise.dtype, tuple(noise.shape[1:]), device)
            if key not in self._graphs:
                self._graphs[key] = self._capture(noise, y)
            g = self._graphs[key]
            g["noise"].copy_(noise)
            g["y"].copy_(y)
            g["graph"].replay()
            out = g["out"].clone()  # the static output is overwritten by the next replay
        if self.decode is not None and not self.decode_in_graph:
            out = self.decode(out)
        return out

    def reset(self):
        """Drop every captured graph (e.g. after the model's weights were replaced by new tensors)."""
        self._graphs.clear()

