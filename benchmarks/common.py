"""Shared pieces of the GPU benchmarks: FLOP formulas, timing, and the model/step builders that both
the pytest-benchmark cases and ``benchmarks/report.py`` use."""
import sys
import time
from typing import Callable, Dict

import torch

from meanflow_fast import MeanFlowLoss, meanflow_dit
from meanflow_fast.model import skip_value_checks

# DiT shapes of the must-show cases: (preset, batch).
CASES = [("B/2", 128), ("XL/2", 64)]

# "cuda" for real measurements; "cpu" only for a dry run of the benchmark code itself
# (TRITON_INTERPRET=1 python -m benchmarks.report --device cpu --cases tiny:4).
DEVICE = "cuda"


def set_device(device: str):
    global DEVICE
    DEVICE = device


def select_device(device: str, script: str) -> bool:
    """A script's ``--device``: set it, or say on stderr that ``script`` needs CUDA and return False."""
    if device == "cuda" and not torch.cuda.is_available():
        print(f"{script} needs a CUDA GPU; none found (--device cpu for a dry run)", file=sys.stderr)
        return False
    set_device(device)
    return True


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------ FLOP counts
def dit_forward_flops(preset: str, batch: int) -> float:
    """Matmul FLOPs of one forward: per block 24·B·N·D² (qkv 6, proj 2, fc1 8, fc2 8) + 4·B·N²·D
    (QKᵀ and PV); the embedders and the final layer are < 1% and left out."""
    cfg = _config(preset)
    N = (cfg.input_size // cfg.patch_size) ** 2
    D = cfg.hidden_size
    return cfg.depth * (24 * batch * N * D * D + 4 * batch * N * N * D)


def dit_jvp_flops(preset: str, batch: int) -> float:
    """Primal + tangent: the linears run twice (48·B·N·D²); attention adds Q̇Kᵀ, QK̇ᵀ, ṖV, PV̇
    (12·B·N²·D in all)."""
    cfg = _config(preset)
    N = (cfg.input_size // cfg.patch_size) ** 2
    D = cfg.hidden_size
    return cfg.depth * (48 * batch * N * D * D + 12 * batch * N * N * D)


def _config(preset: str):
    with torch.device("meta"):
        return meanflow_dit(preset).config


# ------------------------------------------------------------------------------------ timing
def cuda_time_ms(fn: Callable, warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of ``fn()`` in ms, measured with CUDA events after ``warmup`` calls
    (perf_counter in a CPU dry run)."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(iters):
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def peak_memory_mb(fn: Callable) -> float:
    """Peak CUDA memory of one call (0 in a CPU dry run)."""
    if DEVICE != "cuda":
        fn()
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def timed_first_call(fn: Callable) -> float:
    """Seconds of the first call (compilation / autotuning included)."""
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------ builders
def build_model(preset: str, dtype=torch.bfloat16, backend: str = "torch", seed: int = 0):
    """A model with random (non-zero) adaLN and output weights, on CUDA, in ``dtype``."""
    torch.manual_seed(seed)
    model = meanflow_dit(preset)
    model.backend = backend
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name:
                p.normal_(0, 0.02)
    return model.to(DEVICE, dtype)


def model_inputs(model, batch: int, dtype=torch.bfloat16, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    cfg = model.config
    z = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=DEVICE, dtype=dtype, generator=g)
    t = torch.rand(batch, device=DEVICE, generator=g)
    r = t * torch.rand(batch, device=DEVICE, generator=g)
    y = torch.randint(0, cfg.num_classes, (batch,), device=DEVICE, generator=g)
    return dict(z=z, r=r, t=t, y=y, dz=torch.randn_like(z))


# The timed model calls below run inside skip_value_checks (the inputs are valid draws), as the loss's
# calls do: otherwise each would add the value checks' host sync on CUDA.
def func_jvp_fn(model, inp):
    """torch.func.jvp over the plain forward (PyTorch falls back to math SDPA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    y = inp["y"]

    def run():
        with sdpa_kernel([SDPBackend.MATH]), torch.no_grad(), skip_value_checks():
            return torch.func.jvp(lambda z, r, t: model(z, r, t, y), (inp["z"], inp["r"], inp["t"]),
                                  (inp["dz"], torch.zeros_like(inp["r"]), torch.ones_like(inp["t"])))
    return run


def forward_fn(model, inp, backend=None):
    """The plain forward under no_grad; ``backend`` (default: the model's) picks its ops."""
    kw = {} if backend is None else {"backend": backend}

    def run():
        with torch.no_grad(), skip_value_checks():
            return model(inp["z"], inp["r"], inp["t"], inp["y"], **kw)
    return run


def forward_jvp_fn(model, inp, backend: str):
    def run():
        with torch.no_grad(), skip_value_checks():
            return model.forward_jvp(inp["z"], inp["r"], inp["t"], inp["y"], inp["dz"], backend=backend)
    return run


def train_step_fn(model, batch: int, *, meanflow: bool, compiled: bool = False, grads_only: bool = False):
    """One optimisation step under bf16 autocast with fp32 master weights (``model`` in fp32).

    MeanFlow: the paper's loss through ``model.forward_jvp`` (the model's backend decides the path).
    Flow matching: the same loss with ratio_r_neq_t = 0 (one plain forward, flash SDPA).
    ``grads_only``: the loss and ``torch.autograd.grad`` of it, no update (the step
    meanflow_fast/kernels/precompile.py records).
    """
    cfg = model.config
    # The Adam update as each setup runs it best: eager steps use torch's fused CUDA Adam (one pass over
    # parameters, gradients and moments; what meanflow-train uses), compiled steps the foreach Adam
    # that inductor compiles into the step.
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=(DEVICE == "cuda" and not compiled))
    # validate=False: no value checks (device syncs, graph breaks under torch.compile) in the timed step;
    # the draws come from the global RNG for the same reason.
    loss_fn = MeanFlowLoss(ratio_r_neq_t=0.25 if meanflow else 0.0, validate=False)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=DEVICE, generator=g)
    y = torch.randint(0, cfg.num_classes, (batch,), device=DEVICE, generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
            loss, _ = loss_fn(model, x, y)
        loss.backward()
        opt.step()

    def grads():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
            loss, _ = loss_fn(model, x, y)
        return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)

    if grads_only:
        return grads
    return torch.compile(step) if compiled else step
