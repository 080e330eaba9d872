"""Attention forward + tangent: the fused Triton kernel against what a user has today.

    pytest benchmarks/bench_attention.py --benchmark-only

Providers (bf16, the DiT-B/2 batch-128 and DiT-XL/2 batch-64 attention shapes):
  triton_fwd+tangent   kernels.attention.attention_jvp: O and Ȯ in one fused pass
  torch_jvp_math       torch.func.jvp over F.scaled_dot_product_attention with the math backend (the only
                       SDPA backend with forward AD); the baseline of the speed-up ratios
  jvp_flash_attention  torch.func.jvp over jvp_flash_attention's kernel, when it is installed (it rejects
                       head dim 72)
  flash_fwd            flash SDPA forward alone, no tangent: the floor a fused fwd+tangent is judged against
  triton_fwd           kernels.attention.attention, forward alone

FLOP counts (2 FLOPs per multiply-add, written into benchmark.extra_info with TFLOP/s):
  forward              4·B·H·N²·D            QKᵀ and PV: two N×N×D matmuls per (b, h)
  forward + tangent    12·B·H·N²·D = 3× that  QKᵀ, PV, Q̇Kᵀ, QK̇ᵀ, (P⊙Ṡ)V, PV̇: six matmuls
The same count is used for every fwd+tangent provider (the useful work, whatever a provider spends).
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("attention benchmarks need a CUDA GPU", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import meanflow_fast.kernels.attention as attn_mod  # noqa: E402
from benchmarks.tools.attention_sweep import config_label  # noqa: E402
from meanflow_fast.kernels.attention import attention, attention_jvp  # noqa: E402

try:  # fwd_dual is the entry point its README gives for torch.func.jvp (tangents before autograd)
    from jvp_flash_attention.jvp_attention import JVPAttn
    jvp_flash_attention = JVPAttn.fwd_dual
except ImportError:
    jvp_flash_attention = None

SHAPES = {  # name: (B, H, N, D)
    "B2-b128": (128, 12, 256, 64),
    "XL2-b64": (64, 16, 256, 72),
}
PROVIDERS = ["torch_jvp_math", "jvp_flash_attention", "triton_fwd+tangent", "flash_fwd", "triton_fwd"]
INNER = 10  # calls per timed round, one synchronize at the end
_MEDIANS = {}  # (shape, provider) → seconds per call, for the ratios


def fwd_flops(B, H, N, D):
    return 4 * B * H * N * N * D


def fwd_tangent_flops(B, H, N, D):
    return 3 * fwd_flops(B, H, N, D)


def _make_fn(provider, q, k, v, q_dot, k_dot, v_dot):
    """One factory per op: the callable a provider times, and its FLOP count."""
    shape = q.shape
    if provider == "triton_fwd+tangent":
        return (lambda: attention_jvp(q, k, v, q_dot, k_dot, v_dot)), fwd_tangent_flops(*shape)
    if provider == "torch_jvp_math":
        def fn():
            with sdpa_kernel(SDPBackend.MATH):
                return torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (q_dot, k_dot, v_dot))
        return fn, fwd_tangent_flops(*shape)
    if provider == "jvp_flash_attention":
        if jvp_flash_attention is None:
            pytest.skip("jvp_flash_attention is not installed")
        if shape[-1] not in (16, 32, 64, 128, 256):
            pytest.skip(f"jvp_flash_attention does not support head dim {shape[-1]}")
        return (lambda: torch.func.jvp(jvp_flash_attention, (q, k, v), (q_dot, k_dot, v_dot))), \
            fwd_tangent_flops(*shape)
    if provider == "flash_fwd":
        def fn():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)
        return fn, fwd_flops(*shape)
    if provider == "triton_fwd":
        return (lambda: attention(q, k, v)), fwd_flops(*shape)
    raise ValueError(provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_attention_fwd_tangent(benchmark, shape_name, provider):
    torch.manual_seed(0)
    B, H, N, D = SHAPES[shape_name]
    q, k, v, q_dot, k_dot, v_dot = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
                                    for _ in range(6))
    fn, flops = _make_fn(provider, q, k, v, q_dot, k_dot, v_dot)
    for _ in range(3):  # compile and autotune outside the timing
        fn()
    torch.cuda.synchronize()

    def run():
        for _ in range(INNER):
            fn()
        torch.cuda.synchronize()

    benchmark.group = f"attention {shape_name} B={B} H={H} N={N} D={D} bf16"
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    sec = benchmark.stats.stats.median / INNER
    _MEDIANS[(shape_name, provider)] = sec
    benchmark.extra_info.update(ms_per_call=sec * 1e3, flop_count=flops, tflops=flops / sec / 1e12)
    if provider.startswith("triton"):  # the autotuner's pick for this shape (the last launch's key)
        best = getattr(attn_mod._attn_fwd_jvp_kernel, "best_config", None)
        if best is not None:
            benchmark.extra_info["config"] = config_label(best)
    for baseline in ("torch_jvp_math", "jvp_flash_attention"):  # PROVIDERS order: baselines run first
        base = _MEDIANS.get((shape_name, baseline))
        if base is not None and provider != baseline:
            benchmark.extra_info[f"speedup_vs_{baseline}"] = base / sec
