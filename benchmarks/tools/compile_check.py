"""Ahead-of-time compile check of every Triton kernel in ``meanflow_fast/kernels/``, without a GPU.

    python -m benchmarks.tools.compile_check                # bf16+fp16, all configs, sm_90 and sm_80
    python -m benchmarks.tools.compile_check --quick        # bf16, first config of each kernel (~30 s)
    python -m benchmarks.tools.compile_check --dtypes all   # + fp32 (see --dtypes)

Run it before a GPU run with the triton version of the GPU machine (in a separate environment), and
with the local one. Options: --targets 90,80, --kernel NAME, --jobs N, --timeout S, --json FILE.

What it does. Each launcher (``attention_fwd``, ``attention_bwd``, ``dual_linear_fwd``,
``ln_modulate_fwd``/``_bwd``, ``gated_residual_fwd``/``_bwd``, and the iMF ones: ``rms_norm_fwd``/``_bwd``,
``gated_residual_rmsnorm_fwd``/``_bwd``, ``qk_norm_rope_fwd``/``_bwd``, ``swiglu_gate_fwd``, ``swiglu_bwd``; the
forward launchers with and without the tangent stream, HAS_TANGENT=True/False) is called at DiT and iMF sizes on *fake*
CUDA tensors (torch's FakeTensorMode: shapes, strides, dtypes, no memory, no GPU), with every
``@triton.jit``/``@triton.autotune`` object of the ``kernels`` modules replaced by a recorder. The
recorded launch (positional arguments, constexprs, num_warps) is then bound by Triton's own
specialisation code (the binder a real launch uses: pointer dtypes, 16-divisibility of ints and of
pointer offsets, ints equal to 1 turned into constants), once per autotune config of the CUDA config
list (after the autotuner's ``early_config_prune``, if it has one; a ``perf_model`` is not applied),
and compiled with ``triton.compile`` for a ``GPUTarget("cuda", 90, 32)`` (H100/H200) and
``GPUTarget("cuda", 80, 32)`` (A100). The wheel's own ``ptxas`` produces the cubin, so a compile here
runs the same front end, MLIR passes and ptxas as the first launch on the GPU machine with the same
triton version. The signature therefore follows the launchers: a new argument or constexpr needs no
change here; a new launcher or kernel module needs a scenario in ``scenarios()``.

For each compiled kernel it prints registers/thread, spill stores/loads (ptxas ``-v``), the shared
memory Triton requests at launch (``metadata.shared``), the resident blocks per SM these allow, and
how many of its loads Triton turned into asynchronous copies (``cp.async``/TMA ops in the TTGIR: the
pipelined tile loads of a matmul kernel; 0 in a tl.dot kernel means every tile is a register load,
as the D 72 attention kernels had before their stride alignment hint, docs/TUNING.md).
A row is
  OK     compiled and fits the target;
  SPILL  compiled, ptxas spilled registers to local memory (slow, but runs);
  OOR    compiled, but needs more shared memory than one block may have (H100: 232448 B opt-in,
         A100: 166912 B) or more than 65536 registers: the GPU would refuse it at launch
         (the autotuner skips such a config at run time);
  SLOW   the compile ran past --timeout and was killed (the autotuner compiles every config of its
         list at the first launch on the GPU, so this is GPU time);
  FAIL   did not compile (Triton front end, MLIR pass or ptxas error).
Exit status 1 when a config FAILs or when a kernel has *no* config left that compiles and fits
(every config OOR/FAIL: the autotuner would have nothing to run); 0 otherwise (SPILL, SLOW and OOR
of single configs are warnings). The "compile s" column is this machine's compile time of the
config (two compiles share its 2 cores), from the run that filled the cache.

What it cannot check: numerics (tests/ run the kernels in the CPU interpreter for that, and
tests/test_gpu_*.py on a GPU), speed, launch-time errors that depend on real pointers or grid sizes
(e.g. an illegal address), run-time autotuner behaviour, or the driver's JIT of the PTX. Alignment is
taken from the fake tensors' storage offsets assuming 16-byte aligned allocations (true of torch's
CUDA caching allocator). Resource numbers are those of the triton/ptxas installed where it runs, so run
it with the triton version of the GPU machine (3.6 at present) as well as the local one.

TRITON_INTERPRET must be off: the interpreter replaces the jit functions when the kernels are imported
(this script unsets it before importing Triton). Compiles are cached in Triton's cache (with the
ptxas numbers kept beside it in ``<triton cache dir>/../compile_check/``), so a second run is fast.
"""
import argparse
import contextlib
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y"):
    print("compile_check: unsetting TRITON_INTERPRET (the interpreter replaces jit functions)", file=sys.stderr)
os.environ.pop("TRITON_INTERPRET", None)
warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")

import torch  # noqa: E402
import triton  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import meanflow_fast.kernels.attention as attention_mod  # noqa: E402
import meanflow_fast.kernels.gated_residual as gated_mod  # noqa: E402
import meanflow_fast.kernels.gated_residual_ln as gated_ln_mod  # noqa: E402
import meanflow_fast.kernels.layernorm_modulate as ln_mod  # noqa: E402
import meanflow_fast.kernels.linear as linear_mod  # noqa: E402
import meanflow_fast.kernels.mlp as mlp_mod  # noqa: E402  (fc1/fc2 are dual_linear launches; its own kernel: gelu_bwd)
import meanflow_fast.kernels.qk_norm_rope as qk_mod  # noqa: E402
import meanflow_fast.kernels.rmsnorm as rms_mod  # noqa: E402
import meanflow_fast.kernels.swiglu as swiglu_mod  # noqa: E402  (W2 is a dual_linear launch; its own: gate, bwd)

KERNEL_MODULES = (attention_mod, linear_mod, mlp_mod, ln_mod, gated_mod, gated_ln_mod, rms_mod, qk_mod, swiglu_mod)

# Per-target limits (CUDA programming guide, compute capability tables).
LIMITS = {
    90: dict(name="sm_90", smem_block=232448, smem_sm=233472, regs_sm=65536, max_warps_sm=64, max_blocks_sm=32),
    80: dict(name="sm_80", smem_block=166912, smem_sm=167936, regs_sm=65536, max_warps_sm=64, max_blocks_sm=32),
}
HEAVY_SPILL_BYTES = 1024  # spill stores above this are called out in the summary

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------
# Recording the launchers' kernel launches on fake CUDA tensors
# ---------------------------------------------------------------------------------------------
@dataclass
class Launch:
    kernel: Any                 # the Autotuner or JITFunction the launcher indexed with [grid]
    name: str                   # its function name
    args: Tuple                 # positional arguments as the launcher passed them (fake tensors → stand-ins)
    kwargs: Dict[str, Any]      # keyword arguments (constexprs, num_warps, ...)


class TensorArg:
    """What Triton's binder needs of a tensor argument: its dtype and its address (only the address's
    alignment matters; the base allocation is taken as 256-byte aligned, the offset is the view's)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._ptr = 256 * 1024 + t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self._ptr

    @staticmethod
    def ptr_range():
        return 0  # within 32-bit offsets, as a real < 2 GiB tensor


class _Recorder:
    def __init__(self, kernel, sink: List[Launch]):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            conv = tuple(TensorArg(a) if isinstance(a, torch.Tensor) else a for a in args)
            kw = {k: (TensorArg(v) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
            self.sink.append(Launch(self.kernel, _base_fn(self.kernel).__name__, conv, kw))
        return launch


def _base_fn(kernel) -> JITFunction:
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


@contextlib.contextmanager
def recording(sink: List[Launch]):
    """Replace every jit/autotune object of the kernel modules by a recorder (restored on exit: the
    jit helpers that kernels call must be the real ones again before anything is compiled)."""
    linear_mod._cuda_kernel()  # build the lazily created autotuners (dual linear, SwiGLU gate) so they are patched too
    swiglu_mod._cuda_kernel()
    saved = []
    for mod in KERNEL_MODULES:
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, (JITFunction, Autotuner)):
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(obj, sink))
    real_device = torch.cuda.device
    torch.cuda.device = lambda *a, **k: contextlib.nullcontext()  # the CPU build has no CUDA device context
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        torch.cuda.device = real_device
        for mod, name, obj in saved:
            setattr(mod, name, obj)


# ---------------------------------------------------------------------------------------------
# Scenarios: the launchers at the DiT's sizes and layouts
# ---------------------------------------------------------------------------------------------
# (label, hidden size, heads): DiT-B/2 (head dim 64) and DiT-XL/2 (head dim 72: 64 + 16 column chunks).
MODELS = (("B/2", 768, 12), ("XL/2", 1152, 16))
BATCH, TOKENS = 32, 256  # 256 px images: 32×32 latents, patch 2 → 256 tokens


@dataclass
class Scenario:
    family: str                  # kernels this scenario launches, for the table
    variant: str                 # dtype and shape flags
    call: Callable[[], None]     # runs the launcher(s) under FakeTensorMode


def _cuda(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="cuda")


def scenarios(dtypes: List[str]) -> List[Scenario]:
    out = []
    for dt_name in dtypes:
        dt = DTYPES[dt_name]
        for model, hidden, heads in MODELS:
            hd = hidden // heads

            def attn_fwd(dt=dt, hidden=hidden, heads=heads, tangent=False):
                q, k, v = attention_mod.split_qkv(_cuda(BATCH, TOKENS, 3 * hidden, dtype=dt), heads)
                tans = attention_mod.split_qkv(_cuda(BATCH, TOKENS, 3 * hidden, dtype=dt), heads) if tangent else (None,) * 3
                attention_mod.attention_fwd(q, k, v, *tans)

            def attn_bwd(dt=dt, hidden=hidden, heads=heads):
                q, k, v = attention_mod.split_qkv(_cuda(BATCH, TOKENS, 3 * hidden, dtype=dt), heads)
                o = attention_mod._empty_bnhd(q)
                do = attention_mod._empty_bnhd(q)  # grad of the (B, N, H·D) merge: the same layout as o
                lse = _cuda(*q.shape[:3], dtype=torch.float32)
                attention_mod.attention_bwd(do, q, k, v, o, lse)

            for tangent in (False, True):
                out.append(Scenario("attention fwd", f"{dt_name} D={hd}{' +tangent' if tangent else ''}",
                                    lambda f=attn_fwd, t=tangent: f(tangent=t)))
            out.append(Scenario("attention bwd", f"{dt_name} D={hd}", attn_bwd))

            def ln(dt=dt, hidden=hidden):
                x, xd = _cuda(BATCH, TOKENS, hidden, dtype=dt), _cuda(BATCH, TOKENS, hidden, dtype=dt)
                mod, mod_d = _cuda(BATCH, 6 * hidden, dtype=dt), _cuda(BATCH, 6 * hidden, dtype=dt)
                sh, sc = mod.chunk(6, dim=1)[:2]  # the adaLN chunks: non-contiguous (B, D) views
                shd, scd = mod_d.chunk(6, dim=1)[:2]
                m, _, mean, rstd = ln_mod.ln_modulate_fwd(x, sh, sc, xd, shd, scd, 1e-6)
                ln_mod.ln_modulate_bwd(torch.empty_like(m), x, sc, mean, rstd)

            def gated(dt=dt, hidden=hidden):
                x, f, xd, fd = (_cuda(BATCH, TOKENS, hidden, dtype=dt) for _ in range(4))
                g = _cuda(BATCH, 6 * hidden, dtype=dt).chunk(6, dim=1)[2]
                gd = _cuda(BATCH, 6 * hidden, dtype=dt).chunk(6, dim=1)[2]
                y, _ = gated_mod.gated_residual_fwd(x, g, f, xd, gd, fd)
                gated_mod.gated_residual_bwd(torch.empty_like(y), g, f)

            # Primal only (HAS_TANGENT=False: the DiT's plain forward); the backward kernels are the ones above.
            def ln_primal(dt=dt, hidden=hidden):
                x = _cuda(BATCH, TOKENS, hidden, dtype=dt)
                sh, sc = _cuda(BATCH, 6 * hidden, dtype=dt).chunk(6, dim=1)[:2]
                ln_mod.ln_modulate_fwd(x, sh, sc, eps=1e-6)

            def gated_primal(dt=dt, hidden=hidden):
                x, f = _cuda(BATCH, TOKENS, hidden, dtype=dt), _cuda(BATCH, TOKENS, hidden, dtype=dt)
                gated_mod.gated_residual_fwd(x, _cuda(BATCH, 6 * hidden, dtype=dt).chunk(6, dim=1)[2], f)

            def gelu_bwd(dt=dt, hidden=hidden):  # the MLP backward's GELU pass over (B·N, 4·D)
                mlp_mod.gelu_bwd(_cuda(BATCH * TOKENS, 4 * hidden, dtype=dt), _cuda(BATCH * TOKENS, 4 * hidden, dtype=dt))

            out.append(Scenario("mlp gelu_bwd", f"{dt_name} hidden={4 * hidden}", gelu_bwd))

            def gated_ln(dt=dt, hidden=hidden):  # the fused residual + next LN, forward with tangent and backward
                x, f, xd, fd = (_cuda(BATCH, TOKENS, hidden, dtype=dt) for _ in range(4))
                mods = _cuda(BATCH, 6 * hidden, dtype=dt).chunk(6, dim=1)
                mods_d = _cuda(BATCH, 6 * hidden, dtype=dt).chunk(6, dim=1)
                y, _, m, _, mean, rstd = gated_ln_mod.gated_residual_ln_fwd(x, mods[2], f, mods[3], mods[4], xd,
                                                                            mods_d[2], fd, mods_d[3], mods_d[4])
                gated_ln_mod.gated_residual_ln_bwd(torch.empty_like(m), torch.empty_like(y), y, f, mods[2], mods[4],
                                                   mean, rstd)

            def gated_ln_primal(dt=dt, hidden=hidden):  # the plain forward's (HAS_TANGENT=False)
                x, f = _cuda(BATCH, TOKENS, hidden, dtype=dt), _cuda(BATCH, TOKENS, hidden, dtype=dt)
                mods = _cuda(BATCH, 6 * hidden, dtype=dt).chunk(6, dim=1)
                gated_ln_mod.gated_residual_ln_fwd(x, mods[2], f, mods[3], mods[4])

            out.append(Scenario("gated_residual_ln fwd+bwd", f"{dt_name} D={hidden}", gated_ln))
            out.append(Scenario("gated_residual_ln fwd", f"{dt_name} D={hidden} primal", gated_ln_primal))
            out.append(Scenario("ln_modulate fwd+bwd", f"{dt_name} D={hidden}", ln))
            out.append(Scenario("gated_residual fwd+bwd", f"{dt_name} D={hidden}", gated))
            out.append(Scenario("ln_modulate fwd", f"{dt_name} D={hidden} primal", ln_primal))
            out.append(Scenario("gated_residual fwd", f"{dt_name} D={hidden} primal", gated_primal))

        # Dual linear at DiT-B/2: qkv (768 → 2304), proj (768 → 768), fc1 + GELU (768 → 3072, with and
        # without the pre-activation for the backward), fc2 (3072 → 768). fp32 twice: IEEE dots (torch's
        # default "highest" matmul precision) and TF32 ("high").
        precisions = ("highest", "high") if dt == torch.float32 else ("highest",)
        for prec in precisions:
            tag = dt_name + ("/tf32" if prec == "high" else "")

            def lin(dt=dt, prec=prec, n_out=2304, k=768, gelu=False, store_pre=False, merged=False, tangent=True):
                old = torch.get_float32_matmul_precision()
                torch.set_float32_matmul_precision(prec)
                try:
                    if merged:  # proj reads the attention output merged (B, N, H, Dh) → (B, N, D), a view
                        x = _cuda(BATCH, TOKENS, 12, k // 12, dtype=dt).reshape(BATCH, TOKENS, k)
                        xd = _cuda(BATCH, TOKENS, 12, k // 12, dtype=dt).reshape(BATCH, TOKENS, k)
                    else:
                        x, xd = _cuda(BATCH, TOKENS, k, dtype=dt), _cuda(BATCH, TOKENS, k, dtype=dt)
                    w, b = _cuda(n_out, k, dtype=dt), _cuda(n_out, dtype=dt)
                    # impl="triton": CUDA sends epilogue-free launches to cuBLAS by default; the kernel
                    # stays selectable (config switch plain_dual_linear), so every variant is checked
                    linear_mod.dual_linear_fwd(x, w, b, xd if tangent else None, gelu=gelu, store_pre=store_pre,
                                               impl="triton")
                finally:
                    torch.set_float32_matmul_precision(old)

            out.append(Scenario("dual_linear qkv 768→2304", tag, lin))
            out.append(Scenario("dual_linear proj 768→768", tag, lambda f=lin: f(n_out=768, merged=True)))
            out.append(Scenario("dual_linear fc1+gelu+pre 768→3072", tag,
                                lambda f=lin: f(n_out=3072, gelu=True, store_pre=True)))
            out.append(Scenario("dual_linear fc1+gelu 768→3072", tag, lambda f=lin: f(n_out=3072, gelu=True)))
            out.append(Scenario("dual_linear fc2 3072→768", tag, lambda f=lin: f(n_out=768, k=3072)))
            # The primal-only fc1 of kernels.mlp.mlp (HAS_TANGENT=False; its fc2 is cuBLAS).
            out.append(Scenario("dual_linear fc1+gelu+pre primal 768→3072", tag,
                                lambda f=lin: f(n_out=3072, gelu=True, store_pre=True, tangent=False)))
            out.append(Scenario("dual_linear fc1+gelu primal 768→3072", tag,
                                lambda f=lin: f(n_out=3072, gelu=True, tangent=False)))
        out += imf_scenarios(dt_name)
    return out


# iMF (meanflow_fast/imf/model.py): (label, hidden size, heads, SwiGLU hidden); head dim 64 in both, tokens
# 20 prefix + 256 patch.
IMF_MODELS = (("iMF-B/2", 768, 12, 2048), ("iMF-XL/2", 1024, 16, 2730))
IMF_TOKENS = 276
# The SwiGLU backward pass at the benchmarks' batches (benchmarks/common.py, IMF_CASES): its rows per program
# (a constexpr) follow the row count B·N.
IMF_BWD_BATCH = {"iMF-B/2": 128, "iMF-XL/2": 64}


def imf_scenarios(dt_name: str) -> List[Scenario]:
    """The iMF kernels at the iMF presets' sizes: RMSNorm and the gated residual + RMSNorm (forward with
    and without the tangent, backward), QK-norm + RoPE on the model's (B, N, H, D_h) views of the q and
    k projections (forward with and without the tangent, backward), the SwiGLU gate GEMM (with and
    without the tangent and the stored pre-activations; fp32 with IEEE and TF32 dots, as the dual linear)
    and the SwiGLU backward's elementwise pass over (B·N, SwiGLU hidden) at ``IMF_BWD_BATCH``."""
    out = []
    dt = DTYPES[dt_name]
    N = IMF_TOKENS
    for model, hidden, heads, mlp_hidden in IMF_MODELS:
        hd = hidden // heads

        def rms(dt=dt, hidden=hidden, tangent=True):
            x, w = _cuda(BATCH, N, hidden, dtype=dt), _cuda(hidden, dtype=dt)
            y, _, rstd = rms_mod.rms_norm_fwd(x, w, _cuda(BATCH, N, hidden, dtype=dt) if tangent else None, 1e-6)
            if tangent:
                rms_mod.rms_norm_bwd(torch.empty_like(y), x, w, rstd)

        def gated_rms(dt=dt, hidden=hidden, tangent=True):
            x, f = _cuda(BATCH, N, hidden, dtype=dt), _cuda(BATCH, N, hidden, dtype=dt)
            g, w = _cuda(hidden, dtype=dt), _cuda(hidden, dtype=dt)
            tans = (_cuda(BATCH, N, hidden, dtype=dt), _cuda(BATCH, N, hidden, dtype=dt)) if tangent else (None, None)
            rms_mod.gated_residual_rmsnorm_fwd(x, f, g, w, *tans, eps=1e-6)

        def gated_rms_bwd(dt=dt, hidden=hidden, dm=True, dh=True):  # HAS_DM / HAS_DH: which outputs have a gradient
            h, f = _cuda(BATCH, N, hidden, dtype=dt), _cuda(BATCH, N, hidden, dtype=dt)
            g, w = _cuda(hidden, dtype=dt), _cuda(hidden, dtype=dt)
            rstd = _cuda(BATCH * N, dtype=torch.float32)
            rms_mod.gated_residual_rmsnorm_bwd(h, f, g, w, rstd, torch.empty_like(h) if dm else None,
                                               torch.empty_like(h) if dh else None)

        for dm, dh in ((True, True), (True, False), (False, True)):
            grads = "+".join(n for n, on in (("dm", dm), ("dh", dh)) if on)
            out.append(Scenario("gated_residual_rmsnorm bwd", f"{dt_name} D={hidden} {grads}",
                                lambda f=gated_rms_bwd, a=dm, b=dh: f(dm=a, dh=b)))

        def qk(dt=dt, hidden=hidden, heads=heads, hd=hd, tangent=True):
            q, k = (_cuda(BATCH, N, hidden, dtype=dt).unflatten(-1, (heads, hd)) for _ in range(2))
            qw, kw = _cuda(hd, dtype=dt), _cuda(hd, dtype=dt)
            cos, sin = _cuda(N, hd // 2, dtype=torch.float32), _cuda(N, hd // 2, dtype=torch.float32)
            tans = tuple(_cuda(BATCH, N, hidden, dtype=dt).unflatten(-1, (heads, hd)) for _ in range(2)) \
                if tangent else (None, None)
            qo, _, ko, _ = qk_mod.qk_norm_rope_fwd(q, k, qw, kw, cos, sin, *tans, eps=1e-6)
            if tangent:  # gradients of the outputs in their (B, H, N, D) storage
                qk_mod.qk_norm_rope_bwd(torch.empty_like(qo), torch.empty_like(ko), q, k, qw, kw, cos, sin, 1e-6)

        for tangent in (True, False):
            kind = "fwd+bwd" if tangent else "fwd"
            primal = "" if tangent else " primal"
            out.append(Scenario(f"rms_norm {kind}", f"{dt_name} D={hidden}{primal}",
                                lambda f=rms, t=tangent: f(tangent=t)))
            out.append(Scenario("gated_residual_rmsnorm fwd", f"{dt_name} D={hidden}{primal}",
                                lambda f=gated_rms, t=tangent: f(tangent=t)))
            out.append(Scenario(f"qk_norm_rope {kind}", f"{dt_name} H={heads} D={hd}{primal}",
                                lambda f=qk, t=tangent: f(tangent=t)))

        precisions = ("highest", "high") if dt == torch.float32 else ("highest",)
        for prec in precisions:
            tag = dt_name + ("/tf32" if prec == "high" else "")

            def gate(dt=dt, prec=prec, hidden=hidden, mlp_hidden=mlp_hidden, tangent=True, store_ab=False):
                old = torch.get_float32_matmul_precision()
                torch.set_float32_matmul_precision(prec)
                try:
                    x = _cuda(BATCH, N, hidden, dtype=dt)
                    w1, w3 = _cuda(mlp_hidden, hidden, dtype=dt), _cuda(mlp_hidden, hidden, dtype=dt)
                    swiglu_mod.swiglu_gate_fwd(x, w1, w3, _cuda(BATCH, N, hidden, dtype=dt) if tangent else None,
                                               store_ab=store_ab)
                finally:
                    torch.set_float32_matmul_precision(old)

            for tangent in (True, False):
                for store_ab in (True, False):
                    flags = ("" if tangent else " primal") + (" +ab" if store_ab else "")
                    out.append(Scenario(f"swiglu gate {hidden}→{mlp_hidden}{flags}", f"{tag} {model}",
                                        lambda f=gate, t=tangent, s=store_ab: f(tangent=t, store_ab=s)))

        def swiglu_bwd(dt=dt, rows=IMF_BWD_BATCH[model] * N, mlp_hidden=mlp_hidden):
            # dg (the dy W2 GEMM's output) and the saved a, b: contiguous (rows, hidden), as the backward passes them
            swiglu_mod.swiglu_bwd(*(_cuda(rows, mlp_hidden, dtype=dt) for _ in range(3)))

        out.append(Scenario(f"swiglu bwd hidden={mlp_hidden}",
                            f"{dt_name} {model} rows={IMF_BWD_BATCH[model]}·{N}", swiglu_bwd))
    return out


# ---------------------------------------------------------------------------------------------
# Compile jobs
# ---------------------------------------------------------------------------------------------
@dataclass
class Job:
    kernel: str
    variant: str
    config: str
    capability: int
    src: Any = None                         # ASTSource
    options: Dict[str, Any] = field(default_factory=dict)
    group: Tuple = ()                       # (kernel, specialisation, target): its configs stand in for one another
    also: List[str] = field(default_factory=list)
    # results
    status: str = "?"
    regs: Optional[int] = None
    spill_st: Optional[int] = None
    spill_ld: Optional[int] = None
    shared: Optional[int] = None
    warps: Optional[int] = None
    blocks_sm: Optional[int] = None
    async_copies: Optional[int] = None      # cp.async / TMA copy ops in the TTGIR
    error: str = ""
    seconds: float = 0.0


def _config_label(cfg_kwargs: Dict[str, Any], options: Dict[str, Any]) -> str:
    short = {"BLOCK_M": "BM", "BLOCK_N": "BN", "BLOCK_K": "BK", "GROUP_M": "G", "BLOCK_R": "BR",
             "BLOCK_D": "BD", "ROWS_PER_PROG": "RPP"}
    parts = [f"{short.get(k, k)}{v}" for k, v in cfg_kwargs.items()]
    parts.append(f"w{options['num_warps']} s{options['num_stages']}")
    return " ".join(parts)


def build_jobs(launches: List[Tuple[Scenario, Launch]], capabilities: List[int], quick: bool) -> List[Job]:
    jobs: Dict[Tuple, Job] = {}
    binders = {}
    for cap in capabilities:
        target = GPUTarget("cuda", cap, 32)
        backend = make_backend(target)
        for scen, ln in launches:
            fn = _base_fn(ln.kernel)
            if (id(fn), cap) not in binders:
                binders[id(fn), cap] = create_function_from_signature(fn.signature, fn.params, backend)
            binder = binders[id(fn), cap]
            if isinstance(ln.kernel, Autotuner):
                cfgs = ln.kernel.configs
                prune = getattr(ln.kernel, "early_config_prune", None)
                if prune:  # as Autotuner.prune_configs: a per-launch subset (e.g. by dtype) is all that compiles
                    cfgs = prune(cfgs, dict(zip(ln.kernel.arg_names, ln.args)), **ln.kwargs)
                configs = [c.all_kwargs() for c in cfgs]
                tuned = [set(c.kwargs) for c in cfgs]
            else:
                configs, tuned = [{}], [set()]
            if quick:
                configs, tuned = configs[:1], tuned[:1]
            for cfg, tuned_keys in zip(configs, tuned):
                kwargs = {**ln.kwargs, **cfg}
                bound, spec, opts = binder(*ln.args, **kwargs)
                options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
                shown = {k: v for k, v in kwargs.items() if k in tuned_keys or
                         (not tuned_keys and (k.startswith("BLOCK_") or k == "ROWS_PER_PROG"))}
                label = _config_label(shown, options.__dict__)
                spec_key = json.dumps([signature, sorted((str(k), repr(v)) for k, v in constexprs.items() if
                                                         fn.arg_names[k[0]] not in tuned_keys),
                                       sorted((str(k), repr(v)) for k, v in attrs.items())], sort_keys=True)
                key = (fn.__name__, cap, spec_key, label)
                variant = f"{scen.variant} [{scen.family}]" if scen.family.startswith(("dual_linear", "swiglu")) \
                    else scen.variant
                if key in jobs:
                    if variant not in jobs[key].also and variant != jobs[key].variant:
                        jobs[key].also.append(variant)
                    continue
                jobs[key] = Job(fn.__name__, variant, label, cap, ASTSource(fn, signature, constexprs, attrs),
                                options.__dict__, group=(fn.__name__, cap, spec_key))
    return list(jobs.values())


_LOG_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_LOG_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_LOG_REGS = re.compile(r"Used (\d+) registers")


def _parse_ptxas(log: str) -> Optional[Dict[str, int]]:
    """Registers and spills of the entry function from ptxas -v (device functions, if any were not
    inlined, add their spills)."""
    if not _LOG_ENTRY.search(log) or not _LOG_REGS.search(log):
        return None
    regs = max(int(r) for r in _LOG_REGS.findall(log))
    spills = _LOG_SPILL.findall(log)
    return dict(regs=regs, stack=sum(int(s[0]) for s in spills), spill_st=sum(int(s[1]) for s in spills),
                spill_ld=sum(int(s[2]) for s in spills))


@contextlib.contextmanager
def _captured_fds():
    """Capture fds 1 and 2 (Triton prints the ptxas log and the PTX of a failing kernel with print; MLIR
    diagnostics go to fd 2 from C++)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        box = {}
        try:
            yield box
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            f.seek(0)
            box["text"] = f.read().decode("utf-8", "replace")


def _side_cache_dir() -> str:
    d = os.path.join(os.path.dirname(os.path.abspath(knobs.cache.dir)), "compile_check")
    os.makedirs(d, exist_ok=True)
    return d


def _occupancy(job: Job) -> Optional[int]:
    lim = LIMITS[job.capability]
    if job.regs is None or job.warps is None:
        return None
    regs_per_warp = math.ceil(max(job.regs, 1) * 32 / 256) * 256
    by_regs = (lim["regs_sm"] // regs_per_warp) // job.warps
    by_warps = lim["max_warps_sm"] // job.warps
    by_smem = lim["smem_sm"] // (job.shared + 1024) if job.shared else lim["max_blocks_sm"]
    return min(by_regs, by_warps, by_smem, lim["max_blocks_sm"])


def compile_job(job: Job) -> Job:
    """Compile one job and fill in its resource use and status. Runs in a worker process."""
    t0 = time.time()
    target = GPUTarget("cuda", job.capability, 32)
    knobs.nvidia.dump_ptxas_log = True
    info, err, kernel = None, None, None
    for attempt in range(2):
        knobs.compilation.always_compile = attempt == 1  # a cache hit without our ptxas numbers: recompile
        with _captured_fds() as out:
            try:
                kernel = triton.compile(job.src, target=target, options=job.options)
            except Exception as e:  # noqa: BLE001 - any compile error is the finding
                err = e
                tb = traceback.format_exc()
        if err is not None:
            break
        side = os.path.join(_side_cache_dir(), f"{kernel.hash}.json")
        info = _parse_ptxas(out["text"])
        if info is not None:
            info["seconds"] = round(time.time() - t0, 2)
            with open(side, "w") as f:
                json.dump(info, f)
            break
        if os.path.exists(side):
            with open(side) as f:
                info = json.load(f)
            break
    knobs.compilation.always_compile = False
    job.seconds = time.time() - t0
    if info is not None and "seconds" in info:
        job.seconds = info["seconds"]  # the time of the compile that filled the cache, not of the cache hit
    if err is not None:
        job.status = "FAIL"
        lines = f"{type(err).__name__}: {err}".strip().splitlines()
        # A CompilationError reads "at L:C:", the source up to the failing line, then the reason (and its
        # cause's); keep the head, the failing line and the reason.
        if len(lines) > 14:
            lines = lines[:2] + ["  ..."] + lines[-12:]
        diag = [ln for ln in out["text"].splitlines() if "error" in ln.lower()][:5]
        job.error = "\n".join(lines + diag)
        if not job.error.strip():
            job.error = tb[-2000:]
        return job
    md = kernel.metadata
    ttgir = kernel.asm.get("ttgir", "")
    job.async_copies = len(re.findall(r"async_copy_global_to_local|async_tma_copy_global_to_local", ttgir))
    job.shared = int(md.shared)
    job.warps = int(md.num_warps)
    if info is not None:
        job.regs, job.spill_st, job.spill_ld = info["regs"], info["spill_st"], info["spill_ld"]
    job.blocks_sm = _occupancy(job)
    lim = LIMITS[job.capability]
    problems = []
    if job.shared > lim["smem_block"]:
        problems.append(f"shared {job.shared} B > {lim['smem_block']} B")
    if job.regs is not None and job.regs * 32 * job.warps > lim["regs_sm"]:
        problems.append(f"{job.regs} regs × {32 * job.warps} threads > {lim['regs_sm']}")
    if job.warps * 32 > 1024:
        problems.append(f"{job.warps * 32} threads > 1024")
    if problems:
        job.status, job.error = "OOR", "; ".join(problems)
    elif job.spill_st:
        job.status = "SPILL"
    else:
        job.status = "OK"
    return job


_JOBS: List[Job] = []
_RESULT_FIELDS = ("status", "regs", "spill_st", "spill_ld", "shared", "warps", "blocks_sm", "async_copies", "error",
                  "seconds")


def run_jobs(n_parallel: int, timeout: float) -> List[Job]:
    """Compile every job of _JOBS in forked children, at most n_parallel at a time. A child that runs past
    ``timeout`` seconds is killed with its process group (its ptxas too) and its job marked SLOW."""
    pending = list(range(len(_JOBS)))
    running: Dict[int, Tuple[int, float, int]] = {}  # pid → (job index, start time, read end of its pipe)
    while pending or running:
        while pending and len(running) < n_parallel:
            i = pending.pop(0)
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # child: compile, send the result fields back as JSON, exit without cleanup
                code = 0
                try:
                    os.close(r)
                    os.setpgid(0, 0)
                    job = compile_job(_JOBS[i])
                    job.error = job.error[:4000]
                    data = json.dumps({k: getattr(job, k) for k in _RESULT_FIELDS}).encode()
                except BaseException:  # noqa: BLE001
                    data = json.dumps({"status": "FAIL", "error": traceback.format_exc()[-4000:]}).encode()
                    code = 1
                try:
                    while data:
                        data = data[os.write(w, data):]
                finally:
                    os._exit(code)
            os.close(w)
            running[pid] = (i, time.time(), r)
        time.sleep(0.05)
        for pid, (i, start, r) in list(running.items()):
            done, _ = os.waitpid(pid, os.WNOHANG)
            job = _JOBS[i]
            if done == 0 and time.time() - start > timeout:
                try:
                    os.killpg(pid, 9)
                except ProcessLookupError:
                    pass
                os.waitpid(pid, 0)
                job.status, job.seconds = "SLOW", time.time() - start
                job.error = f"compile killed after {timeout:.0f} s"
            elif done == 0:
                continue
            else:
                raw = b""
                while True:
                    chunk = os.read(r, 65536)
                    if not chunk:
                        break
                    raw += chunk
                try:
                    for k, v in json.loads(raw.decode()).items():
                        setattr(job, k, v)
                except ValueError:
                    job.status, job.error = "FAIL", f"compile process died (no result): {raw[-500:]!r}"
            os.close(r)
            del running[pid]
            if job.status in ("FAIL", "SLOW"):
                print(f"  {job.status}: {job.kernel} [{job.variant}] {job.config} {LIMITS[job.capability]['name']}",
                      flush=True)
    return _JOBS


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def print_table(jobs: List[Job]) -> None:
    head = ("kernel", "variant", "config", "target", "regs", "spill st/ld", "shared B", "blk/SM", "cp.async",
            "compile s", "status")
    rows = []
    for j in jobs:
        variant = j.variant + (f" (+{len(j.also)} alike)" if j.also else "")
        spill = "-" if j.spill_st is None else f"{j.spill_st}/{j.spill_ld}"
        rows.append((j.kernel, variant, j.config, LIMITS[j.capability]["name"],
                     "-" if j.regs is None else str(j.regs), spill, "-" if j.shared is None else str(j.shared),
                     "-" if j.blocks_sm is None else str(j.blocks_sm),
                     "-" if j.async_copies is None else str(j.async_copies), f"{j.seconds:.1f}", j.status))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)] if rows else [len(h) for h in head]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def _reason(job: Job) -> str:
    """One line of a job's error: its last non-blank line (a compile error's reason comes last)."""
    lines = [ln.strip() for ln in job.error.splitlines() if ln.strip() and ln.strip() != "^"]
    return lines[-1][:200] if lines else ""


def summarize(jobs: List[Job], record_errors: List[str]) -> int:
    print()
    print(f"triton {triton.__version__}, torch {torch.__version__}: {len(jobs)} compiles "
          f"({sum(j.seconds for j in jobs):.0f} s of compile time)")
    counts = {s: sum(j.status == s for j in jobs) for s in ("OK", "SPILL", "OOR", "SLOW", "FAIL")}
    print("  " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    fatal = bool(record_errors)
    for e in record_errors:
        print(f"ERROR recording a launcher call: {e}")
    for j in jobs:
        if j.status == "FAIL":
            fatal = True
            print(f"\nFAIL {j.kernel} [{j.variant}] {j.config} {LIMITS[j.capability]['name']}:")
            print("  " + j.error.replace("\n", "\n  "))
    groups: Dict[Tuple, List[Job]] = {}
    for j in jobs:
        groups.setdefault(j.group, []).append(j)
    for g, js in groups.items():
        if all(j.status in ("FAIL", "OOR") for j in js):
            fatal = True
            print(f"\nERROR no usable config: {js[0].kernel} [{js[0].variant}] on {LIMITS[g[1]]['name']}: "
                  + "; ".join(f"{j.config}: {j.status} {_reason(j)}" for j in js))
    slow = [j for j in jobs if j.status == "SLOW"]
    if slow:
        print("\nSLOW to compile (killed; on the GPU the autotuner compiles every config of a list at its first "
              "launch, so these cost GPU time before anything runs):")
        for j in slow:
            print(f"  {j.kernel} [{j.variant}] {j.config} {LIMITS[j.capability]['name']}: {j.error}")
    slowish = sorted((j for j in jobs if j.status != "SLOW" and j.seconds > 10), key=lambda j: -j.seconds)
    if slowish:
        print("\nCompiles over 10 s on this machine:")
        for j in slowish[:12]:
            print(f"  {j.seconds:6.1f} s  {j.kernel} [{j.variant}] {j.config} {LIMITS[j.capability]['name']}")
    oor = [j for j in jobs if j.status == "OOR"]
    if oor:
        print("\nOut of resources (the autotuner skips these at run time; dead weight in the config list):")
        for j in oor:
            print(f"  {j.kernel} [{j.variant}] {j.config} {LIMITS[j.capability]['name']}: {j.error}")
    spills = sorted((j for j in jobs if j.spill_st), key=lambda j: -j.spill_st)
    if spills:
        heavy = [j for j in spills if j.spill_st > HEAVY_SPILL_BYTES]
        shown = heavy + [j for j in spills if j.spill_st <= HEAVY_SPILL_BYTES][:10]
        print(f"\nRegister spills ({len(spills)} compiles, {len(heavy)} with over {HEAVY_SPILL_BYTES} B of spill "
              f"stores, marked '!'):")
        for j in shown:
            mark = "!" if j.spill_st > HEAVY_SPILL_BYTES else " "
            print(f" {mark} {j.kernel} [{j.variant}] {j.config} {LIMITS[j.capability]['name']}: "
                  f"{j.regs} regs, {j.spill_st} B spill stores, {j.spill_ld} B spill loads")
        if len(spills) > len(shown):
            print(f"   ... and {len(spills) - len(shown)} more with at most {spills[len(shown)].spill_st} B "
                  "(see the table)")
    users: Dict[Tuple, List[str]] = {}
    for j in sorted((j for j in jobs if j.shared is not None), key=lambda j: -j.shared):
        users.setdefault((j.shared, j.kernel, j.config, j.capability, j.blocks_sm), []).append(j.variant)
    if users:
        print("\nLargest shared-memory users:")
        for (shared, kernel, config, cap, blocks), variants in list(users.items())[:8]:
            print(f"  {shared:>7} B  {kernel} {config} {LIMITS[cap]['name']} ({blocks} block(s)/SM): "
                  + ", ".join(variants[:3]) + (f" +{len(variants) - 3}" if len(variants) > 3 else ""))
    print("\nRESULT:", "FAILED (compile failure or a kernel without a usable config)" if fatal else
          "all kernels compile, every kernel has a usable config")
    return 1 if fatal else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="bf16 only, first autotune config of each kernel")
    p.add_argument("--targets", default="90,80", help="compute capabilities, comma-separated (default 90,80)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated subset of bf16,fp16,fp32, or 'all' (default bf16,fp16; --quick: bf16). fp32 "
                        "adds about a minute on 2 cores (the attention and dual-linear autotuners prune fp32 to "
                        "small tiles; before that, IEEE fp32 dots took ~15 more minutes with triton 3.6)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds one compile may take before it is killed and reported SLOW (default 120)")
    p.add_argument("--kernel", default=None, help="only kernels whose name contains this string")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles (default 2)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = p.parse_args(argv)

    caps = [int(c) for c in a.targets.split(",") if c.strip()]
    for c in caps:
        if c not in LIMITS:
            p.error(f"target {c} unknown; known: {sorted(LIMITS)}")
    if a.dtypes == "all":
        dtypes = list(DTYPES)
    else:
        dtypes = a.dtypes.split(",") if a.dtypes else (["bf16"] if a.quick else ["bf16", "fp16"])
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"dtype {d} unknown; known: {list(DTYPES)}")

    launches, record_errors = [], []
    for scen in scenarios(dtypes):
        sink: List[Launch] = []
        try:
            with recording(sink):
                scen.call()
        except Exception as e:  # noqa: BLE001
            record_errors.append(f"{scen.family} [{scen.variant}]: {type(e).__name__}: {e}")
            continue
        if not sink:
            record_errors.append(f"{scen.family} [{scen.variant}]: the launcher launched no recorded kernel")
        launches += [(scen, ln) for ln in sink if a.kernel is None or a.kernel in ln.name]

    global _JOBS
    _JOBS = build_jobs(launches, caps, a.quick)
    print(f"compile_check: triton {triton.__version__}, {len(_JOBS)} compiles "
          f"({len({j.kernel for j in _JOBS})} kernels, targets {', '.join(LIMITS[c]['name'] for c in caps)}, "
          f"dtypes {', '.join(dtypes)}, {a.jobs} parallel)", flush=True)
    t0 = time.time()
    done = run_jobs(max(1, a.jobs), a.timeout)
    print(f"compiled in {time.time() - t0:.0f} s wall\n")
    print_table(done)
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{k: v for k, v in vars(j).items() if k not in ("src", "options", "group")} for j in done],
                      f, indent=1)
    return summarize(done, record_errors)


if __name__ == "__main__":
    sys.exit(main())
