"""Shared pieces of the GPU benchmarks: FLOP formulas, timing, and the model/step builders that both
the pytest-benchmark cases and ``benchmarks/report.py`` use."""
import contextlib
import sys
import time
from typing import Callable, Dict, Optional

import torch

from meanflow_fast import MeanFlowLoss, meanflow_dit
from meanflow_fast.model import skip_value_checks

# DiT shapes of the must-show cases: (preset, batch).
CASES = [("B/2", 128), ("XL/2", 64)]
# iMF cases (``report.py --cases iMF-B/2:128,iMF-XL/2:64``): an iMF preset of meanflow_fast.imf.IMF_PRESETS
# behind this prefix.
IMF_PREFIX = "iMF-"
IMF_CASES = [("B/2", 128), ("XL/2", 64)]

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
    """Peak CUDA memory of one call (0 in a CPU dry run, without the call)."""
    if DEVICE != "cuda":
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


# ------------------------------------------------------------------------------------ per-op cases
# The per-op pytest-benchmark cases (bench_dual_ops.py, bench_imf_ops.py) time OP_ITERS launches per round
# with one sync per round, on CUDA.
OP_ITERS = 10


def op_time_ms(fn: Callable, iters: int = OP_ITERS) -> float:
    """Median ms of one call of ``fn``: CUDA events around ``iters`` calls, 10 rounds."""
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return sorted(times)[len(times) // 2]


def bench_op(benchmark, fn: Callable, compiled: bool, work: float, unit: str, baseline_ms: float, shape: str,
             iters: int = OP_ITERS) -> float:
    """One per-op case: a first call outside the timing (through ``torch.compile`` when ``compiled``; a call
    that fails skips the case with the reason), then pytest-benchmark over 10 rounds of ``iters`` calls.
    Records in ``benchmark.extra_info`` the median ``ms`` per call, the rate in ``unit`` ("TFLOP/s" or
    "GB/s") of ``work`` (FLOPs or bytes per call), ``x_eager_ref_fwd`` = ms / ``baseline_ms`` and ``shape``;
    returns the ms."""
    import pytest  # the benchmark cases' dependency, not report.py's
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn)
    try:
        fn()
    except Exception as e:  # a provider torch.compile cannot handle is reported, not fatal
        pytest.skip(f"{'compiled ' if compiled else ''}provider failed to run: {type(e).__name__}: {e}"[:300])
    torch.cuda.synchronize()

    def rounds():
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()

    benchmark.pedantic(rounds, rounds=10, warmup_rounds=2)
    ms = benchmark.stats.stats.median * 1e3 / iters
    rate = work / (ms * 1e-3) / (1e12 if unit == "TFLOP/s" else 1e9)
    benchmark.extra_info.update({"ms": round(ms, 4), unit: round(rate, 1),
                                 "x_eager_ref_fwd": round(ms / baseline_ms, 3), "shape": shape})
    return ms


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


# ------------------------------------------------------------------------------------ iMF
# The iMF DiT (meanflow_fast/imf/model.py): no adaLN, prefix tokens, QK-norm + RoPE, SwiGLU, a u-head and a
# v-head over a shared trunk. Its backend is the model's ``backend`` attribute, as MeanFlowDiT's.
def _imf_config(preset: str):
    from meanflow_fast.imf import imf_dit
    with torch.device("meta"):
        return imf_dit(preset).config


def imf_shape(preset: str, batch: int) -> Dict[str, int]:
    """The iMF model's op shapes at (preset, batch): B, N (tokens, the prefix included), D, HEADS, HEAD_DIM and
    HIDDEN (SwiGLU's)."""
    c = _imf_config(preset)
    return dict(B=batch, N=c.num_tokens, D=c.hidden_size, HEADS=c.num_heads, HEAD_DIM=c.hidden_size // c.num_heads,
                HIDDEN=c.mlp_hidden)


def _imf_block_flops(preset: str, batch: int):
    """(linear, attention) matmul FLOPs of one iMF block's primal: q, k, v, out 8·B·N·D², SwiGLU's three
    D×H_mlp linears 6·B·N·D·H_mlp; QKᵀ and PV 4·B·N²·D (N counts the prefix tokens)."""
    c = _imf_config(preset)
    N, D = c.num_tokens, c.hidden_size
    return 8 * batch * N * D * D + 6 * batch * N * D * c.mlp_hidden, 4 * batch * N * N * D, c


def imf_forward_flops(preset: str, batch: int) -> float:
    """The plain forward with both heads (``heads="both"``): trunk + u-head + v-head, depth + head_depth
    blocks; embedders and final layers left out, as in ``dit_forward_flops``."""
    lin, att, c = _imf_block_flops(preset, batch)
    return (c.depth + c.head_depth) * (lin + att)


def imf_jvp_flops(preset: str, batch: int) -> float:
    """``forward_jvp``: trunk and u-head (depth blocks) on both streams (linears twice, attention three
    times: QKᵀ, PV, Q̇Kᵀ, QK̇ᵀ, ṖV, PV̇) and the v-head (head_depth blocks) on the primal alone."""
    lin, att, c = _imf_block_flops(preset, batch)
    return c.depth * (2 * lin + 3 * att) + c.head_depth * (lin + att)


def build_imf_model(preset: str, dtype=torch.bfloat16, backend: str = "torch", seed: int = 0):
    """An iMF model with random (non-zero) gates and final layers (zero at init, which would make every
    block an identity and the outputs zero), on ``DEVICE`` in ``dtype``. ``backend`` is set as the model's
    attribute; a backend the model cannot run fails at the first call, where report.py reports it."""
    from meanflow_fast.imf import imf_dit
    torch.manual_seed(seed)
    model = imf_dit(preset)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn_gate", "mlp_gate")) or "final.linear" in name:
                p.normal_(0, 0.02)
    model.backend = backend
    return model.to(DEVICE, dtype)


def imf_inputs(model, batch: int, dtype=torch.bfloat16, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A valid draw of every input of ``IMFDiT.forward`` (0 ≤ h ≤ t ≤ 1, ω ∈ [1, 8], t_min ≤ t_max) and a
    tangent dz."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    c = model.config
    z = torch.randn(batch, c.in_channels, c.input_size, c.input_size, device=DEVICE, dtype=dtype, generator=g)
    t = torch.rand(batch, device=DEVICE, generator=g)
    h = t * torch.rand(batch, device=DEVICE, generator=g)
    omega = 1 + 7 * torch.rand(batch, device=DEVICE, generator=g)
    t_min = 0.5 * torch.rand(batch, device=DEVICE, generator=g)
    t_max = 0.5 + 0.5 * torch.rand(batch, device=DEVICE, generator=g)
    y = torch.randint(0, c.num_classes, (batch,), device=DEVICE, generator=g)
    return dict(z=z, t=t, h=h, omega=omega, t_min=t_min, t_max=t_max, y=y, dz=torch.randn_like(z))


def _imf_args(inp):
    return inp["z"], inp["t"], inp["h"], inp["omega"], inp["t_min"], inp["t_max"], inp["y"]


@contextlib.contextmanager
def _imf_backend(model, backend: Optional[str]):
    """The iMF model's ``backend`` attribute set to ``backend`` for a call (None: the model's own)."""
    if backend is None:
        yield
        return
    saved, model.backend = model.backend, backend
    try:
        yield
    finally:
        model.backend = saved


def imf_forward_fn(model, inp, backend: Optional[str] = None):
    """The plain forward with both heads, (u, v), under no_grad: what ``forward_jvp`` returns less u̇.
    ``backend`` (default: the model's) picks its ops."""
    def run():
        with _imf_backend(model, backend), torch.no_grad(), skip_value_checks():
            return model(*_imf_args(inp), heads="both")
    return run


def imf_forward_jvp_fn(model, inp, backend: str):
    """``model.forward_jvp`` along (dz, dt = 1, dh = 1) on ``backend``."""
    def run():
        with _imf_backend(model, backend), torch.no_grad(), skip_value_checks():
            return model.forward_jvp(*_imf_args(inp), inp["dz"], dt=1.0, dh=1.0)
    return run


def imf_func_jvp_fn(model, inp):
    """torch.func.jvp over the plain forward (torch ops, math SDPA) along (dz, dh = 1), v as aux: the
    same outputs as ``forward_jvp`` (except that the v-head runs inside the transform)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    z, t, h, omega, t_min, t_max, y = _imf_args(inp)

    def run():
        with sdpa_kernel([SDPBackend.MATH]), torch.no_grad(), skip_value_checks():
            return torch.func.jvp(lambda z_, h_: model(z_, t, h_, omega, t_min, t_max, y, heads="both"), (z, h),
                                  (inp["dz"], torch.ones_like(h)), has_aux=True)
    return run


# iMF's logit-normal time draw (IMFLoss's defaults): t = sigmoid(mu + sigma·n), n ~ N(0, 1).
IMF_FM_TIME_MU, IMF_FM_TIME_SIGMA = -0.4, 1.0


def imf_fm_loss(model, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching loss of an iMF network's v-head, the baseline of the iMF step: z = (1 − t)·x + t·ε,
    loss = mean over all elements of (v(z, t, h = 0, ω = 1, [0, 1] | y) − (ε − x))², in fp32 (x (B, C, H, W),
    t (B,), ε like x). The v call runs the trunk and the v-head only (``heads="v"``)."""
    tb = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    z = (1 - tb) * x + tb * noise
    zero, one = torch.zeros_like(t), torch.ones_like(t)
    v = model(z, t, zero, one, zero, one, y, heads="v")
    return (v.float() - (noise - x).float()).pow(2).mean()


def imf_train_step_fn(model, batch: int, *, imf: bool, compiled: bool = False):
    """One optimisation step of an iMF model (``model`` in fp32) under bf16 autocast, as ``train_step_fn``.

    iMF: ``IMFLoss`` with its official defaults (the model's backend decides the path), backward, Adam.
    Flow matching: ``imf_fm_loss`` of the same network (trunk + v-head, one plain forward), t logit-normal
    with IMFLoss's (mu, sigma), ε ~ N(0, 1), drawn in the step from the global RNG.
    """
    from meanflow_fast.imf import IMFLoss
    c = model.config
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=(DEVICE == "cuda" and not compiled))
    loss_fn = IMFLoss(validate=False)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, device=DEVICE, generator=g)
    y = torch.randint(0, c.num_classes, (batch,), device=DEVICE, generator=g)

    def loss():
        if imf:
            return loss_fn(model, x, y)[0]
        t = torch.sigmoid(IMF_FM_TIME_MU + IMF_FM_TIME_SIGMA * torch.randn(batch, device=DEVICE))
        with skip_value_checks():  # valid draws; no host sync in the timed step
            return imf_fm_loss(model, x, y, t, torch.randn_like(x))

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
            value = loss()
        value.backward()
        opt.step()

    return torch.compile(step) if compiled else step
