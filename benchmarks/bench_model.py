"""Whole-model benchmarks (GPU, bf16): the JVP (u, du/dt), the MeanFlow vs flow-matching train step,
and the sampler; the same JVP and train-step cases for the iMF model (``IMF_CASES``). Run:
``pytest benchmarks/ --benchmark-only``; ``python -m benchmarks.report`` prints the ratio table of the
same cases and writes it as JSON (``--cases iMF-B/2:128,iMF-XL/2:64`` for the iMF one)."""
import pytest
import torch

from benchmarks.common import (CASES, IMF_CASES, IMF_PREFIX, build_imf_model, build_model, dit_forward_flops,
                               dit_jvp_flops, forward_fn, forward_jvp_fn, func_jvp_fn, imf_forward_flops,
                               imf_forward_fn, imf_forward_jvp_fn, imf_func_jvp_fn, imf_inputs, imf_jvp_flops,
                               imf_train_step_fn, model_inputs, train_step_fn)


def _run(benchmark, fn, flops=None, rounds=10):
    fn()  # warm-up (compilation, autotuning) outside the timed rounds

    def synced():
        fn()
        torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=2)
    mean_s = benchmark.stats.stats.mean
    if flops:
        benchmark.extra_info["tflops"] = round(flops / mean_s / 1e12, 1)
    benchmark.extra_info["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)


@pytest.mark.parametrize("preset,batch", CASES)
@pytest.mark.parametrize("provider", ["forward_eager", "forward_compiled", "forward_triton", "torch_jvp",
                                      "torch_jvp_compiled", "ours_torch", "ours_triton"])
def test_model_jvp(benchmark, preset, batch, provider):
    model = build_model(preset)
    inp = model_inputs(model, batch)
    benchmark.group = f"model {preset} b{batch}"
    if provider.startswith("forward"):  # eager/compiled: torch ops; triton: the fused primal-only kernels
        m = torch.compile(model) if provider.endswith("compiled") else model
        fn = forward_fn(m, inp, "triton" if provider.endswith("triton") else "torch")
        flops = dit_forward_flops(preset, batch)
    elif provider.startswith("torch_jvp"):
        fn = func_jvp_fn(model, inp)
        fn = torch.compile(fn) if provider.endswith("compiled") else fn
        flops = dit_jvp_flops(preset, batch)
    else:
        fn, flops = forward_jvp_fn(model, inp, provider.split("_")[1]), dit_jvp_flops(preset, batch)
    _run(benchmark, fn, flops)


@pytest.mark.parametrize("preset,batch", CASES)
@pytest.mark.parametrize("provider", ["fm_eager", "fm_compiled", "meanflow_triton", "meanflow_tritoncompiled",
                                      "meanflow_torch"])
def test_train_step(benchmark, preset, batch, provider):
    """Flow matching (torch ops) eager and compiled; MeanFlow on the fused kernels eager, and compiled
    (inductor around the custom ops), and on the explicit torch rules."""
    kind, mode = provider.split("_")
    model = build_model(preset, dtype=torch.float32, backend="triton" if mode.startswith("triton") else "torch")
    fn = train_step_fn(model, batch, meanflow=(kind == "meanflow"), compiled=mode.endswith("compiled"))
    benchmark.group = f"train step {preset} b{batch}"
    _run(benchmark, fn, rounds=5)


@pytest.mark.parametrize("preset,batch", IMF_CASES)
@pytest.mark.parametrize("provider", ["forward_eager", "forward_compiled", "forward_triton", "torch_jvp",
                                      "torch_jvp_compiled", "ours_torch", "ours_triton"])
def test_imf_model_jvp(benchmark, preset, batch, provider):
    """The iMF model's rows of test_model_jvp: the plain forward with both heads (torch ops eager and
    compiled; the fused primal-only kernels), torch.func.jvp over it (eager, compiled) and ``forward_jvp``
    (u, u̇, v) on each backend."""
    model = build_imf_model(preset)
    inp = imf_inputs(model, batch)
    benchmark.group = f"model {IMF_PREFIX}{preset} b{batch}"
    if provider == "forward_compiled":  # the model's own backend (torch), as report.py's row
        fn, flops = imf_forward_fn(torch.compile(model), inp), imf_forward_flops(preset, batch)
    elif provider.startswith("forward"):
        fn, flops = imf_forward_fn(model, inp, provider.split("_")[1]), imf_forward_flops(preset, batch)
    elif provider.startswith("torch_jvp"):
        fn = imf_func_jvp_fn(model, inp)
        fn = torch.compile(fn) if provider.endswith("compiled") else fn
        flops = imf_jvp_flops(preset, batch)
    else:
        fn, flops = imf_forward_jvp_fn(model, inp, provider.split("_")[1]), imf_jvp_flops(preset, batch)
    _run(benchmark, fn, flops)


@pytest.mark.parametrize("preset,batch", IMF_CASES)
@pytest.mark.parametrize("provider", ["fm_eager", "fm_compiled", "imf_triton", "imf_tritoncompiled", "imf_torch"])
def test_imf_train_step(benchmark, preset, batch, provider):
    """The iMF model's rows of test_train_step: flow matching on the same network (v-head, torch ops) eager
    and compiled; the iMF step (IMFLoss) on the fused kernels eager and compiled, and on the torch backend."""
    kind, mode = provider.split("_")
    model = build_imf_model(preset, dtype=torch.float32, backend="triton" if mode.startswith("triton") else "torch")
    fn = imf_train_step_fn(model, batch, imf=(kind == "imf"), compiled=mode.endswith("compiled"))
    benchmark.group = f"train step {IMF_PREFIX}{preset} b{batch}"
    _run(benchmark, fn, rounds=5)


@pytest.mark.parametrize("batch", [1, 256])
@pytest.mark.parametrize("provider", ["eager", "compiled", "graph"])
def test_sampler(benchmark, batch, provider):
    from meanflow_fast import sample
    from meanflow_fast.graph_sampler import GraphSampler
    # backend "torch": the plain forward on torch ops, as report.py's sampler table (the "forward triton"
    # rows of test_model_jvp / report.py compare the fused primal forward).
    model = build_model("B/2", dtype=torch.bfloat16, backend="torch").eval()
    y = torch.randint(0, 1000, (batch,), device="cuda")
    noise = torch.randn(batch, 4, 32, 32, device="cuda", dtype=torch.bfloat16)
    if provider == "graph":
        sampler = GraphSampler(model)
        fn = lambda: sampler(y, noise)  # noqa: E731
    else:
        m = torch.compile(model) if provider == "compiled" else model
        fn = lambda: sample(m, y, noise=noise)  # noqa: E731
    benchmark.group = f"sampler 1-NFE B/2 b{batch}"
    _run(benchmark, fn, dit_forward_flops("B/2", batch))
    benchmark.extra_info["images_per_s"] = round(batch / benchmark.stats.stats.mean, 1)
